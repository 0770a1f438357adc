"""pytest integration of the real-kernel guest (see tests/guest/harness).

Tests under tests/guest/ need real root in a real kernel.  This conftest has
two modes:

* On the host (``OOMGUARD_IN_GUEST`` unset) every *selected* test item under
  tests/guest/ is replaced by a ``GuestItem``.  The first one to run boots ONE
  guest that runs ``pytest <all selected guest node ids>`` as root; each
  GuestItem then reports its test's outcome in the guest.  Only "passed"
  passes: failures, errors, skips, xfails and tests the guest never finished
  all fail, and a guest that cannot boot fails every guest item with the
  console tail.  Host-only tests in other directories run as usual.

* In the guest (``OOMGUARD_IN_GUEST=1``) tests run normally; this conftest
  then only provides fixtures (``unpriv_user``, ``other_user``, ``cgroup``,
  ``kmsg``, ``guest_results_dir``) and records every test outcome for the host.

Writing a guest test: it runs as root (all capabilities) in a chroot of the
host's / (read-only 9p) with writable tmpfs overlays on /tmp /var /etc /root
/home /srv /opt /mnt /media, a fresh /run, and the repository read-only.
Nothing runs in the guest but your test: start services yourself, inside a
cgroup if their memory must be charged there (``cgroup.popen([...])``), and
stop them in a fixture finalizer.  Files written to /results (the
``guest_results_dir`` fixture) land in the host's results directory.

Host-side knobs (environment): OOMGUARD_GUEST_RESULTS (host dir for junit.xml,
console.log, outcomes.jsonl, ...; default: a new temp dir),
OOMGUARD_GUEST_TIMEOUT (seconds, default 1500: the suite takes about 8 min unloaded), OOMGUARD_GUEST_MEM (MiB,
default 1024), OOMGUARD_GUEST_CPUS (default 2), OOMGUARD_GUEST_PLUGIN_AUTOLOAD=1
(also load entry-point pytest plugins in the guest; off by default since they
cost seconds under TCG).  The guest console is streamed live unless -q.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pwd
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

GUEST_DIR = Path(__file__).resolve().parent
if str(GUEST_DIR) not in sys.path:  # `import harness` under any --import-mode
    sys.path.insert(0, str(GUEST_DIR))

from daemon_fixture import start_daemon  # noqa: E402
from harness import GuestError, run_guest  # noqa: E402

IN_GUEST = os.environ.get("OOMGUARD_IN_GUEST") == "1"
REPORT_ENV = "OOMGUARD_GUEST_REPORT"  # in the guest: where to write per-test outcomes (JSON lines)
HOST_IGNORED_MARKS = {"skip", "skipif", "xfail"}


# =============================================================================
# Host side: run all selected guest tests in one guest boot
# =============================================================================


class GuestTestFailed(Exception):
    """A guest test did not pass in the guest; the message says why."""


class GuestItem(pytest.Item):
    """Stand-in for a guest test on the host: reports the test's guest outcome."""

    def __init__(self, *, original: pytest.Item, **kwargs):
        super().__init__(**kwargs)
        self._location = original.reportinfo()
        # Keep the markers, except those that would let the host skip/xfail
        # the item: those are evaluated in the guest, where skipping fails.
        self.own_markers = [m for m in original.own_markers if m.name not in HOST_IGNORED_MARKS]
        self.keywords.update(original.keywords)

    def runtest(self) -> None:
        status, text = _guest_run(self.session).outcome(self.nodeid)
        if status != "passed":
            raise GuestTestFailed(text)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, GuestTestFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self._location


def _is_guest_test(item: pytest.Item) -> bool:
    return Path(item.path).resolve().is_relative_to(GUEST_DIR)


if not IN_GUEST:

    @pytest.hookimpl(trylast=True)  # after -k/-m deselection and other plugins
    def pytest_collection_modifyitems(session, config, items):
        for i, item in enumerate(items):
            if _is_guest_test(item) and not isinstance(item, GuestItem):
                items[i] = GuestItem.from_parent(item.parent, name=item.name, original=item)
                assert items[i].nodeid == item.nodeid, (items[i].nodeid, item.nodeid)

    def pytest_terminal_summary(terminalreporter, exitstatus, config):
        run = getattr(config, "_oomguard_guest_run", None)
        if run is not None:
            terminalreporter.write_sep("-", "oomguard guest")
            terminalreporter.write_line(run.summary())


@dataclass
class _GuestOutcome:
    status: str  # passed | failed | skipped | missing
    text: str


class _GuestRun:
    """The single guest boot that runs all selected guest tests."""

    def __init__(self, session: pytest.Session):
        config = session.config
        self.nodeids = [item.nodeid for item in session.items if isinstance(item, GuestItem)]
        self.results_dir = Path(
            os.environ.get("OOMGUARD_GUEST_RESULTS")
            or tempfile.mkdtemp(prefix="oomguard-guest-pytest-")
        ).resolve()
        self.results_dir.mkdir(parents=True, exist_ok=True)
        report = self.results_dir / "outcomes.jsonl"
        for stale in (report, self.results_dir / "junit.xml"):
            stale.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "pytest", *self.nodeids, "-p", "no:cacheprovider", "-v"]
        argv += ["--junitxml=/results/junit.xml", f"--rootdir={config.rootpath}"]
        if config.inipath:
            argv.append(f"--config-file={config.inipath}")
        if config.option.maxfail:
            argv.append(f"--maxfail={config.option.maxfail}")

        self.error: str | None = None
        self.result = None
        capman = config.pluginmanager.getplugin("capturemanager")
        started = time.monotonic()
        with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
            stream = _Prefixed(sys.stdout, "guest| ") if config.get_verbosity() >= 0 else None
            if stream:
                stream.out.write(
                    f"\n--- booting the guest for {len(self.nodeids)} guest test(s) ---\n"
                )
            try:
                self.result = run_guest(
                    argv,
                    timeout=float(os.environ.get("OOMGUARD_GUEST_TIMEOUT", 1500)),
                    memory_mib=int(os.environ.get("OOMGUARD_GUEST_MEM", 1024)),
                    cpus=int(os.environ.get("OOMGUARD_GUEST_CPUS", 2)),
                    env=self.env(),
                    results_dir=self.results_dir,
                    stream=stream,
                    cwd=config.rootpath,
                )
            except GuestError as exc:
                self.error = f"the guest failed, so no guest test ran: {exc}"
            except Exception as exc:  # a harness bug: report it once per item, don't retry
                self.error = f"the guest harness crashed: {exc!r}"
            if stream:
                stream.out.write("\n--- guest finished ---\n")
        self.seconds = time.monotonic() - started
        self.outcomes = _read_outcomes(report)

    @staticmethod
    def env() -> dict[str, str]:
        env = {REPORT_ENV: "/results/outcomes.jsonl"}
        # Entry-point plugins (hypothesis, benchmark, ...) cost seconds of startup
        # under TCG and guest tests don't need them; opt back in if one does.
        if os.environ.get("OOMGUARD_GUEST_PLUGIN_AUTOLOAD") != "1":
            env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        return env

    def outcome(self, nodeid: str) -> tuple[str, str]:
        if self.error:
            return "failed", self.error
        out = self.outcomes.get(nodeid)
        if out is None or out.status == "missing":
            tail = "\n".join(self.result.console.splitlines()[-40:])
            why = out.text if out else "it was not reported by the guest run"
            return "missing", (
                f"did not finish in the guest: {why} (guest pytest exit status "
                f"{self.result.returncode}); console: {self.results_dir / 'console.log'}\n{tail}"
            )
        if out.status == "skipped":
            return "failed", f"skipped in the guest, which counts as a failure: {out.text}"
        return out.status, out.text

    def summary(self) -> str:
        if self.result is None:
            return f"guest failed after {self.seconds:.1f} s; results: {self.results_dir}"
        r = self.result
        return (
            f"{len(self.nodeids)} guest test(s); command started {r.boot_seconds:.1f} s after launching QEMU, "
            f"guest ran {r.total_seconds:.1f} s; console.log and junit.xml in {self.results_dir}"
        )


def _guest_run(session: pytest.Session) -> _GuestRun:
    config = session.config
    if getattr(config, "_oomguard_guest_run", None) is None:
        config._oomguard_guest_run = _GuestRun(session)
    return config._oomguard_guest_run


def _read_outcomes(report: Path) -> dict[str, _GuestOutcome]:
    """Fold the guest's setup/call/teardown reports into one outcome per node id.

    "passed" needs a passing call AND a teardown report: a test whose run was
    cut short (the guest pytest crashed) is "missing", not passed.
    """
    phases: dict[str, list[dict]] = {}
    if report.exists():
        for line in report.read_text().splitlines():
            rep = json.loads(line)
            phases.setdefault(rep["nodeid"], []).append(rep)
    outcomes = {}
    for nodeid, reps in phases.items():
        problems = []
        for rep in reps:
            if rep.get("wasxfail") is not None:
                status, prefix = "skipped", f"xfailed/xpassed ({rep['wasxfail']}): "
            elif rep["outcome"] == "failed":
                status, prefix = (
                    "failed",
                    "" if rep["when"] == "call" else f"error in {rep['when']}: ",
                )
            elif rep["outcome"] == "skipped":
                status, prefix = "skipped", ""
            else:
                continue
            text = prefix + rep["longrepr"]
            for title, content in rep.get("sections", []):
                text += f"\n{'-' * 10} {title} {'-' * 10}\n{content}"
            problems.append((status, text))
        whens = {rep["when"] for rep in reps}
        if any(status == "failed" for status, _ in problems):
            status = "failed"
        elif problems:
            status = "skipped"
        elif {"call", "teardown"} <= whens:
            status = "passed"
        else:
            last = max(whens, key=["setup", "call", "teardown"].index)
            status, problems = (
                "missing",
                [("missing", f"the guest run stopped after its {last} phase")],
            )
        outcomes[nodeid] = _GuestOutcome(status, "\n".join(text for _, text in problems))
    return outcomes
    for line in report.read_text().splitlines():
        rep = json.loads(line)
        status = "failed" if rep["outcome"] == "failed" else rep["outcome"]
        if rep["when"] != "call" and status == "passed":
            outcomes.setdefault(rep["nodeid"], _GuestOutcome("passed", ""))  # setup/teardown ok
            continue
        text = rep["longrepr"]
        if rep["when"] != "call" and status == "failed":
            text = f"error in {rep['when']}: {text}"
        if rep.get("wasxfail") is not None:
            status, text = "skipped", f"xfailed/xpassed ({rep['wasxfail']}): {text}"
        for title, content in rep.get("sections", []):
            text += f"\n{'-' * 10} {title} {'-' * 10}\n{content}"
        old = outcomes.get(rep["nodeid"])
        if old is None or old.status == "passed":
            outcomes[rep["nodeid"]] = _GuestOutcome(status, text)
        elif status != "passed":
            old.text += "\n" + text
    return outcomes


class _Prefixed:
    """Writes to ``out`` with ``prefix`` at the start of every line."""

    def __init__(self, out, prefix: str):
        self.out, self.prefix, self.bol = out, prefix, True

    def write(self, text: str) -> None:
        if not text:
            return
        lines = text.split("\n")
        body = ("\n" + self.prefix).join(lines)
        self.out.write(
            (self.prefix if self.bol else "")
            + (body[: -len(self.prefix)] if text.endswith("\n") else body)
        )
        self.bol = text.endswith("\n")

    def flush(self) -> None:
        self.out.flush()


# =============================================================================
# Guest side: outcome report for the host and fixtures for guest tests
# =============================================================================

# Popped so that processes started by guest tests (a nested pytest...) don't write to it.
_REPORT_PATH = os.environ.pop(REPORT_ENV, None) if IN_GUEST else None

if _REPORT_PATH:

    def pytest_runtest_logreport(report):
        text = report.longreprtext
        if report.skipped and isinstance(report.longrepr, tuple):  # (path, lineno, reason)
            path, lineno, reason = report.longrepr
            text = f"{path}:{lineno}: {reason}"
        crash = getattr(report.longrepr, "reprcrash", None)
        if crash is not None:  # the one-line summary goes first (pytest's -ra line shows it)
            text = f"{crash.message.splitlines()[0] if crash.message else ''}\n\n{text}"
        record = {
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "longrepr": text,
            "wasxfail": getattr(report, "wasxfail", None),
            "sections": report.sections if report.outcome != "passed" else [],
        }
        with open(_REPORT_PATH, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


@pytest.fixture(scope="session")
def guest_results_dir() -> Path:
    """/results in the guest: files written here end up in the host's results dir."""
    return Path(os.environ.get("OOMGUARD_GUEST_RESULTS", "/results"))


@dataclass(frozen=True)
class GuestUser:
    """A regular (non-root) login user created in the guest's writable /etc."""

    name: str
    uid: int
    gid: int
    home: Path

    def argv(self, cmd: Sequence[str | os.PathLike]) -> list[str]:
        """``cmd`` prefixed to run as this user (setpriv, with supplementary groups)."""
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--init-groups",
            "--",
            *map(str, cmd),
        ]

    def env(self, **extra: str) -> dict[str, str]:
        """A login-like environment for this user (PATH includes sys.executable's dir)."""
        base = {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": os.environ["PATH"],
        }
        return base | {"LANG": "C.UTF-8"} | extra

    def run(self, cmd: Sequence[str | os.PathLike], **kwargs) -> subprocess.CompletedProcess:
        """subprocess.run(cmd) as this user; text mode and captured output by default."""
        kwargs.setdefault("env", self.env())
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 120)
        return subprocess.run(self.argv(cmd), **kwargs)


def _ensure_user(name: str) -> GuestUser:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--create-home", "--user-group", "--shell", "/bin/bash", name], check=True
        )
        pw = pwd.getpwnam(name)
    return GuestUser(pw.pw_name, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir))


@pytest.fixture(scope="session")
def _guest_users() -> dict[str, GuestUser]:
    return {name: _ensure_user(name) for name in ("shopuser", "otheruser")}


@pytest.fixture(scope="session")
def unpriv_user(_guest_users) -> GuestUser:
    """``shopuser``: the regular (uid >= 1000) user that owns the shop."""
    return _guest_users["shopuser"]


@pytest.fixture(scope="session")
def other_user(_guest_users) -> GuestUser:
    """``otheruser``: a second regular user, e.g. for cross-user checks."""
    return _guest_users["otheruser"]


CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass
class Cgroup:
    """A cgroup v2 directory with the memory and pids controllers available."""

    path: Path

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def write(self, name: str, value: object) -> None:
        (self.path / name).write_text(str(value))

    def stat(self, name: str = "memory.events") -> dict[str, int]:
        """Flat-keyed files such as memory.events / memory.stat as a dict."""
        return {k: int(v) for k, v in (line.split() for line in self.read(name).splitlines())}

    def pids(self) -> list[int]:
        return [int(p) for p in self.read("cgroup.procs").split()]

    def add(self, pid: int) -> None:
        """Move a process here (its existing memory charges stay behind!)."""
        self.write("cgroup.procs", pid)

    def argv(self, cmd: Sequence[str | os.PathLike]) -> list[str]:
        """``cmd`` prefixed so that it starts inside this cgroup (charges land here).

        Composes with GuestUser.argv: ``cg.argv(user.argv([...]))``.
        """
        return [
            "/bin/sh",
            "-c",
            'echo $$ > "$0" && exec "$@"',
            str(self.path / "cgroup.procs"),
            *map(str, cmd),
        ]

    def popen(self, cmd: Sequence[str | os.PathLike], **kwargs) -> subprocess.Popen:
        """Start ``cmd`` in this cgroup; returns once the process is inside it."""
        proc = subprocess.Popen(self.argv(cmd), **kwargs)
        deadline = time.monotonic() + 30
        while proc.pid not in self.pids() and proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{cmd} did not enter {self.path}")
            time.sleep(0.005)
        return proc

    def child(self, name: str) -> Cgroup:
        """A sub-cgroup (enables memory+pids for children; this one must then hold no processes)."""
        self.write("cgroup.subtree_control", "+memory +pids")
        (self.path / name).mkdir(exist_ok=True)
        return Cgroup(self.path / name)

    def populated(self) -> bool:
        return self.stat("cgroup.events")["populated"] == 1

    def destroy(self, timeout: float = 10) -> None:
        """Kill everything inside (cgroup.kill) and remove this cgroup and its children."""
        if not self.path.exists():
            return
        self.write("cgroup.kill", 1)
        deadline = time.monotonic() + timeout
        while self.populated():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.path} still populated {timeout} s after cgroup.kill: {self.pids()}"
                )
            time.sleep(0.02)
        # The daemon removes its run cgroups when a run ends, concurrently with
        # this walk, so a child that vanishes under us is already done.
        for dirpath, _dirs, _files in os.walk(self.path, topdown=False):
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(dirpath)
        if self.path.exists():
            raise RuntimeError(f"{self.path} could not be removed")


_cgroup_ids = itertools.count()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, unpriv_user):
    """A real `oomguard daemon` with the default test config, one per module
    (the allowed user's: shopuser); a module needing another config has its own."""
    d = start_daemon(tmp_path_factory.mktemp("daemon"))
    yield d
    d.stop()


@pytest.fixture
def cgroup(request) -> Cgroup:
    """A fresh cgroup under /sys/fs/cgroup; everything in it is killed afterwards."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:60]
    cg = Cgroup(CGROUP_ROOT / f"test-{slug}-{os.getpid()}-{next(_cgroup_ids)}")
    cg.path.mkdir()
    yield cg
    cg.destroy()


class Kmsg:
    """Follows the kernel log (/dev/kmsg) from the moment it was opened."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self.fd, 0, os.SEEK_END)
        self.lines: list[str] = []

    def read(self) -> list[str]:
        """New messages since the last call (text only), also appended to .lines."""
        new = []
        while True:
            try:
                record = os.read(self.fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except BrokenPipeError:  # ring buffer overran us; continue with what is left
                continue
            new.append(record.split(";", 1)[-1].split("\n", 1)[0])
        self.lines += new
        return new

    def wait_for(self, pattern: str, timeout: float = 10) -> re.Match:
        """Wait for a message matching the regex ``pattern`` (seen now or already)."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        seen = 0
        while True:
            self.read()
            for line in self.lines[seen:]:
                if m := rx.search(line):
                    return m
            seen = len(self.lines)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no kernel message matching {pattern!r} within {timeout} s")
            time.sleep(0.05)

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def kmsg() -> Kmsg:
    """Kernel messages logged during the test (follow live: the ring overflows on OOM floods)."""
    k = Kmsg()
    yield k
    k.close()
