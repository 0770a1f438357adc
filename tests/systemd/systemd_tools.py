"""Helpers for tests under systemd (in the guest): units, cgroups, waiting."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def run(argv: list[str], *, check: bool = True, timeout: float = 120, **kwargs):
    """subprocess.run in text mode with output captured; raises with the output on failure."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{argv} exited {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    return proc


def systemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["systemctl", "--no-pager", *args], check=check)


def unit_property(unit: str, name: str) -> str:
    return systemctl("show", "--value", "-p", name, unit).stdout.strip()


def main_pid(unit: str) -> int:
    return int(unit_property(unit, "MainPID"))


def cgroup_of(pid: int) -> str:
    """The cgroup v2 path of ``pid`` (the ``0::`` line of /proc/PID/cgroup)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"no cgroup v2 line in /proc/{pid}/cgroup")


def oom_score_adj(pid: int) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 60) -> object:
    """Poll ``predicate`` until it returns something true; fail with ``what``."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)
    return value


UNIT_DIR = Path("/etc/systemd/system")
DEBS_ENV = "OOMGUARD_TEST_DEBS"  # in the guest: the dir with the package test's .debs (conftest.build_debs)
NEXT_SUFFIX = "+next1"  # the upgrade's version: this tree's, one step up
OOMGUARD = str(Path(sys.executable).with_name("oomguard"))


def oomguard(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([OOMGUARD, *args], check=check, timeout=180)


@contextlib.contextmanager
def setup_installed(*start: str) -> Iterator[subprocess.CompletedProcess]:
    """`oomguard setup` (which starts oomguard.service), then ``start`` units.

    Afterwards everything is stopped and every file that appeared under
    /etc/systemd/system is removed, whatever setup itself can undo, so that
    the next test module sees the boot's state."""
    before = set(UNIT_DIR.rglob("*"))
    try:
        result = oomguard("setup")
        if start:
            systemctl("start", *start)
        yield result
    finally:
        systemctl("stop", "oomguard.service", *start, check=False)
        # the slices setup wrote stay active once units ran in them (the
        # flagship's): stopped too, so the next module sees none of ours
        systemctl("stop", "oomguard-app.slice", "oomguard.slice", check=False)
        systemctl("disable", "oomguard.service", check=False)
        for p in sorted(set(UNIT_DIR.rglob("*")) - before, reverse=True):
            p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
        systemctl("daemon-reload")
        systemctl("reset-failed", check=False)
