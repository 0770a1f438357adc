"""Protected runs under systemd: from a real PAM login session, into a transient scope.

The app user logs in with ``runuser -l`` (pam_systemd: logind gives the
session a session-N.scope in user-UID.slice); ``oom-protect`` there asks the
daemon installed by ``oomguard setup``, which puts the run in a transient
oomguard-run-N.scope of its own.  The scope belongs in the caller's slice,
so that every limit of the caller's still holds for the run (issue 13).
"""

from __future__ import annotations

import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from systemd_tools import (
    cgroup_of,
    oom_score_adj,
    setup_installed,
    systemctl,
    unit_property,
    wait_until,
)

OOM_PROTECT = str(Path(sys.executable).with_name("oom-protect"))


@pytest.fixture(scope="module")
def daemon():
    with setup_installed():
        wait_until(lambda: os.path.exists("/run/oomguard/protect.sock"), "the broker socket")
        yield
    systemctl("stop", "oomguard-run-*.scope", check=False)


def login(user: str, command: str) -> subprocess.Popen:
    """``command`` in a real login session of ``user`` (PAM, pam_systemd, logind)."""
    return subprocess.Popen(
        ["runuser", "-l", user, "-c", command],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def read_lines(proc: subprocess.Popen, count: int, timeout: float = 120) -> list[str]:
    """The first ``count`` lines of ``proc``'s output, waiting at most ``timeout``."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while len(lines) < count:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"only {lines} from {proc.args} within {timeout} s")
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"{proc.args} ended after {lines} (status {proc.wait()})")
        lines.append(line.rstrip("\n"))
    return lines


def end(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


def test_a_run_from_a_login_session_is_in_its_own_scope_in_the_callers_slice(daemon, app_user):
    inner = "echo $$; cat /proc/self/cgroup; exec sleep 60"
    proc = login(app_user.name, f"{OOM_PROTECT} sh -c {shlex.quote(inner)}")
    try:
        pid_line, cgroup_line = read_lines(proc, 2)
        pid = int(pid_line)
        # CMD itself saw the scope: it was in place before CMD started
        slice_ = f"user-{app_user.uid}.slice"
        m = re.fullmatch(rf"0::/user\.slice/{slice_}/(oomguard-run-\d+\.scope)", cgroup_line)
        assert m, f"{cgroup_line!r} is not an oomguard-run-N.scope in {slice_}"
        assert cgroup_of(pid) == cgroup_line[3:]
        assert oom_score_adj(pid) == -1000
        assert unit_property(m[1], "Slice") == slice_
    finally:
        end(proc)


def test_the_callers_memory_limit_holds_for_the_run(daemon, app_user):
    slice_ = f"user-{app_user.uid}.slice"
    # granted first (so the session and its slice exist), allocating once told to
    hog = (
        "import sys; print('granted', flush=True); print(open('/proc/self/cgroup').read().strip(), flush=True); "
        "sys.stdin.readline(); b = b'x' * (100 << 20); print('allocated 100 MiB', flush=True)"
    )
    proc = login(app_user.name, shlex.join([OOM_PROTECT, sys.executable, "-c", hog]))
    run_cgroup = None
    try:
        granted, cgroup_line = read_lines(proc, 2)
        assert granted == "granted"
        run_cgroup = Path("/sys/fs/cgroup" + cgroup_line.removeprefix("0::"))
        events = Path(f"/sys/fs/cgroup/user.slice/{slice_}/memory.events")
        ooms_before = memory_events(events)["oom"]
        systemctl("set-property", "--runtime", slice_, "MemoryMax=64M")
        proc.stdin.write("go\n")
        proc.stdin.flush()

        # At -1000 the hog is never killed: if the limit holds, it spins at
        # the limit and the slice counts OOMs; if not, it gets its 100 MiB.
        def outcome() -> str | None:
            if memory_events(events)["oom"] > ooms_before:
                return "the slice's limit stopped the run"
            ready, _, _ = select.select([proc.stdout], [], [], 0.1)
            line = proc.stdout.readline() if ready else ""
            return f"the run escaped the limit: {line.strip()}" if "allocated" in line else None

        assert wait_until(outcome, "the hog to hit a limit", timeout=120) == (
            "the slice's limit stopped the run"
        )
    finally:
        if run_cgroup is not None and (run_cgroup / "cgroup.kill").exists():
            (run_cgroup / "cgroup.kill").write_text("1")
        end(proc)
        systemctl("set-property", "--runtime", slice_, "MemoryMax=infinity", check=False)


def memory_events(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}
