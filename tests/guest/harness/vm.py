"""Boot the throw-away QEMU guest and run one command in it as root."""

from __future__ import annotations

import codecs
import ctypes
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .initramfs import build_initramfs
from .kernel import INSTALL_HINT, KernelError, ensure_kernel
from .systemd import write_boot_files

REPO_ROOT = Path(__file__).resolve().parents[3]
GUEST_RESULTS = "/results"
QEMU = "qemu-system-x86_64"
QBOOT = Path("/usr/share/qemu/qboot.rom")  # minimal firmware: ~0.2 s faster than SeaBIOS

READY = "OOMGUARD-GUEST: ready"
DONE = "OOMGUARD-GUEST: command exited"
ERROR = "OOMGUARD-GUEST-ERROR:"

FLAVOURS = ("plain", "systemd")

#: Exit status used by __main__ (and meaningful to callers) when the guest failed.
GUEST_FAILURE = 125

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class GuestError(RuntimeError):
    """The guest did not boot, timed out, or finished without an exit status."""

    def __init__(self, message: str, console: str = "", results_dir: Path | None = None):
        self.console = console
        self.results_dir = results_dir
        tail = console_tail(console)
        super().__init__(
            f"{message}\n--- last guest console lines ---\n{tail}" if tail else message
        )


def console_tail(console: str, lines: int = 60) -> str:
    return "\n".join(console.rstrip("\n").splitlines()[-lines:])


@dataclass
class GuestResult:
    returncode: int
    console: str
    results_dir: Path
    #: host seconds from starting QEMU until the guest started the command
    boot_seconds: float
    #: host seconds from starting QEMU until QEMU exited
    total_seconds: float


def kvm_usable() -> bool:
    """KVM only with a real (non-PVM) KVM and hardware virtualisation."""
    if os.environ.get("OOMGUARD_GUEST_ACCEL") in ("tcg", "kvm"):
        return os.environ["OOMGUARD_GUEST_ACCEL"] == "kvm"
    if Path("/sys/module/kvm_pvm").exists() or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        return bool(
            re.search(r"^flags\s*:.*\b(vmx|svm)\b", Path("/proc/cpuinfo").read_text(), re.M)
        )
    except OSError:
        return False


def guest_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The command's environment: a clean base, ``env`` on top."""
    base = {
        "PATH": f"{Path(sys.executable).parent}:{DEFAULT_PATH}",
        "HOME": "/root",
        "USER": "root",
        "LOGNAME": "root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OOMGUARD_IN_GUEST": "1",
        "OOMGUARD_GUEST_RESULTS": GUEST_RESULTS,
        # the repo is read-only in the guest: keep hypothesis' example db off it
        "HYPOTHESIS_STORAGE_DIRECTORY": "/tmp/.hypothesis",
    }
    return base | (env or {})


def _command_script(argv: list[str], cwd: Path, env: dict[str, str]) -> str:
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
    return (
        "# written by tests/guest/harness/vm.py; run by the guest's /init inside the chroot\n"
        f"cd {shlex.quote(str(cwd))} || exit {GUEST_FAILURE}\n"
        f"exec /usr/bin/env -i {assignments} {shlex.join(argv)}\n"
    )


def qemu_argv(
    vmlinux: Path, initrd: Path, results_dir: Path, *, memory_mib: int, cpus: int
) -> list[str]:
    qemu = shutil.which(QEMU) or QEMU
    if kvm_usable():
        accel = ["-accel", "kvm", "-cpu", "host"]
    else:
        accel = ["-accel", "tcg,tb-size=256", "-cpu", "max"]
    debug = bool(os.environ.get("OOMGUARD_GUEST_DEBUG"))
    cmdline = [
        "console=ttyS0",
        "rdinit=/init",
        "panic=-1",
        "mitigations=off",
        "random.trust_cpu=on",
        "tsc=reliable",
        "no_timer_check",
        "i8042.noaux",
        "i8042.nokbd",
        "i8042.nopnp",
        "nowatchdog",
        # quiet + loglevel=1: keep kernel chatter (e.g. the OOM-killer's
        # floods) off the slow serial console; read /dev/kmsg instead.
        *(
            ["earlyprintk=ttyS0", "loglevel=7", "oomguard.debug"]
            if debug
            else ["quiet", "loglevel=1"]
        ),
    ]
    return [
        qemu,
        *(["-bios", str(QBOOT)] if QBOOT.is_file() else []),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        *accel,
        "-smp", str(cpus),
        "-m", str(memory_mib),
        "-serial", "stdio",
        "-kernel", str(vmlinux),
        "-initrd", str(initrd),
        "-append", " ".join(cmdline),
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={results_dir},mount_tag=results,security_model=none,multidevs=remap",
    ]  # fmt: skip


class _Console(threading.Thread):
    """Reads QEMU's stdout (the serial console), streams and records it."""

    def __init__(self, pipe, stream: TextIO | None, log: TextIO):
        super().__init__(daemon=True)
        self.pipe, self.stream, self.log = pipe, stream, log
        self.chunks: list[str] = []
        self.ready_at: float | None = None
        self.done_at: float | None = None
        self._line = ""

    def run(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := os.read(self.pipe.fileno(), 65536):
            text = decoder.decode(chunk).replace("\r", "")
            self.chunks.append(text)
            self.log.write(text)
            if self.stream is not None:
                try:
                    self.stream.write(text)
                    self.stream.flush()
                except (OSError, ValueError):
                    self.stream = None
            self._scan(text)
        self.log.flush()

    def _scan(self, text: str) -> None:
        self._line += text
        *lines, self._line = self._line.split("\n")
        for line in lines:
            if READY in line and self.ready_at is None:
                self.ready_at = time.monotonic()
            elif DONE in line:
                self.done_at = time.monotonic()

    @property
    def text(self) -> str:
        return "".join(self.chunks)


def run_guest(
    argv: list[str],
    *,
    timeout: float = 1200,
    memory_mib: int = 1024,
    cpus: int = 2,
    env: dict[str, str] | None = None,
    results_dir: Path | None = None,
    stream: TextIO | None = None,
    cwd: Path | str | None = None,
    writable: list[str] | tuple[str, ...] = (),
    readonly: list[str] | tuple[str, ...] = (REPO_ROOT,),
    hostname: str = "oomguard-guest",
    flavour: str = "plain",
) -> GuestResult:
    """Boot a fresh guest, run ``argv`` as root in it and return its exit status.

    ``argv`` runs chrooted into the host's root filesystem (read-only, with
    writable tmpfs overlays on /tmp /var /etc /root /home /srv /opt /mnt /media
    and the paths in ``writable``; the paths in ``readonly``, by default the
    repository, stay read-only even inside those), in ``cwd`` (default: the
    repository root), with ``guest_env(env)`` as its whole environment.  ``results_dir``
    (default: a new temp dir) is mounted read-write at /results in the guest;
    the console is saved there as ``console.log``.  Raises GuestError if the
    guest does not report an exit status within ``timeout`` seconds.

    ``flavour="systemd"`` boots systemd as PID 1 into oomguard-test.target
    and runs ``argv`` as oomguard-test.service (see harness/systemd.py); the
    result means the same.
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, not {flavour!r}")
    if not argv:
        raise ValueError("argv must not be empty")
    if not shutil.which(QEMU):
        raise GuestError(f"{QEMU} not found; {INSTALL_HINT}")
    try:
        vmlinux = ensure_kernel()
        initrd = build_initramfs(vmlinux)
    except KernelError as exc:
        raise GuestError(str(exc)) from exc

    if results_dir is None:
        results_dir = Path(tempfile.mkdtemp(prefix="oomguard-guest-"))
        results_dir.chmod(0o755)
    results_dir = Path(results_dir).resolve()
    control = results_dir / ".guest"
    control.mkdir(parents=True, exist_ok=True)
    (results_dir / "rc").unlink(missing_ok=True)
    cwd = Path(cwd or REPO_ROOT).resolve()
    (control / "cmd.sh").write_text(_command_script(list(argv), cwd, guest_env(env)))
    for name, paths in (("readonly", readonly), ("writable", writable)):
        (control / name).write_text("".join(f"{Path(d).resolve()}\n" for d in paths))
    (control / "hostname").write_text(hostname + "\n")
    shutil.rmtree(control / "systemd", ignore_errors=True)  # a reused results dir
    if flavour == "systemd":
        write_boot_files(control)

    cmd = qemu_argv(vmlinux, initrd, results_dir, memory_mib=memory_mib, cpus=cpus)
    (control / "qemu.argv").write_text(shlex.join(cmd) + "\n")
    started = time.monotonic()
    with open(results_dir / "console.log", "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        console = _Console(proc.stdout, stream, log)
        console.start()
        timed_out = _wait(proc, console, started + timeout)
        console.join(10)
        proc.stdout.close()
    total = time.monotonic() - started
    text = console.text

    if timed_out:
        stage = "the command was still running" if console.ready_at else "it never finished booting"
        raise GuestError(
            f"guest timed out after {timeout:.0f} s ({stage}) and was killed", text, results_dir
        )
    try:
        returncode = int((results_dir / "rc").read_text().strip())
    except (OSError, ValueError):
        why = next((ln for ln in text.splitlines() if ERROR in ln), None)
        if not text.strip():
            why = (
                "no console output at all: the guest reset before its console came up "
                f"(too little memory for the {memory_mib} MiB guest? "
                "OOMGUARD_GUEST_DEBUG=1 shows early kernel messages)"
            )
        raise GuestError(
            f"guest finished without an exit status (qemu exit status {proc.returncode})"
            + (f": {why.strip()}" if why else ""),
            text,
            results_dir,
        ) from None
    boot = (console.ready_at or started) - started
    return GuestResult(returncode, text, results_dir, boot, total)


def _wait(proc: subprocess.Popen, console: _Console, deadline: float) -> bool:
    """Wait for QEMU to exit; kill it at the deadline or if it lingers after
    the guest reported the command's end.  Returns True on time-out."""
    try:
        while True:
            remaining = deadline - time.monotonic()
            if console.done_at is not None:
                remaining = min(remaining, console.done_at + 20 - time.monotonic())
            try:
                proc.wait(timeout=max(0.0, min(remaining, 0.5)))
                return False
            except subprocess.TimeoutExpired:
                if remaining <= 0:
                    _kill(proc)
                    return console.done_at is None
    except BaseException:  # KeyboardInterrupt etc.: never leave QEMU behind
        _kill(proc)
        raise


def _die_with_parent() -> None:
    """In the QEMU child: get SIGKILLed if the harness process dies (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
