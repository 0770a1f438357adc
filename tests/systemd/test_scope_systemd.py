"""Protected runs under systemd: from a real PAM login session, into a transient scope.

The app user logs in with ``runuser -l`` (pam_systemd: logind gives the
session a session-N.scope in user-UID.slice); ``oom-protect`` there asks the
daemon installed by ``oomguard setup``, which puts the run in a transient
oomguard-run-N.scope of its own.  The scope belongs in the caller's slice,
so that every limit of the caller's still holds for the run (issue 13).
"""

from __future__ import annotations

import json
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
    OOMGUARD,
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


_pending: dict[int, bytes] = {}  # pid -> output read but not yet split into lines


def read_lines(proc: subprocess.Popen, count: int, timeout: float = 120) -> list[str]:
    """The next ``count`` lines of ``proc``'s output, waiting at most ``timeout``.
    Read from the fd itself: a buffered readline may hold lines that select()
    no longer sees."""
    fd = proc.stdout.fileno()
    buf = _pending.pop(proc.pid, b"")
    deadline = time.monotonic() + timeout
    while buf.count(b"\n") < count:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            _pending[proc.pid] = buf  # kept for the next call
            raise AssertionError(f"only {buf!r} from {proc.args} within {timeout} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise AssertionError(f"{proc.args} ended after {buf!r} (status {proc.wait()})")
        buf += chunk
    *lines, rest = buf.split(b"\n", count)
    _pending[proc.pid] = rest
    return [line.decode(errors="replace") for line in lines]


def rest_of_output(proc: subprocess.Popen) -> str:
    """Whatever ``proc`` wrote after the lines read_lines returned, to its end."""
    out = _pending.pop(proc.pid, b"")
    while chunk := os.read(proc.stdout.fileno(), 65536):
        out += chunk
    return out.decode(errors="replace")


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
            try:
                (line,) = read_lines(proc, 1, timeout=0.1)
            except AssertionError:
                return None
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


def runs_as_root() -> list[dict]:
    out = subprocess.run([str(Path(sys.executable).with_name("oomguard")), "runs", "--all", "--json"],
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return json.loads(out.stdout)


def test_a_budgeted_run_gets_a_scope_with_memory_max_and_is_ended_at_its_budget(daemon, app_user):
    """oom-protect --memory-max under systemd: the scope carries MemoryMax=
    and MemorySwapMax=0; at the budget the daemon ends the run at once."""
    eat = ("import sys; print(open('/proc/self/cgroup').read().strip(), flush=True); sys.stdin.readline(); "
           "chunks = [b'x' * (1 << 20) for _ in range(200)]; print('ate 200 MiB', flush=True)")  # fmt: skip
    proc = login(app_user.name, shlex.join([OOM_PROTECT, "--memory-max", "48M", sys.executable, "-c", eat]))
    try:
        (cgroup_line,) = read_lines(proc, 1)
        m = re.fullmatch(rf"0::/user\.slice/user-{app_user.uid}\.slice/(oomguard-run-(\d+)\.scope)", cgroup_line)
        assert m, cgroup_line
        scope, run_id = m[1], int(m[2])
        assert unit_property(scope, "MemoryMax") == str(48 << 20)
        assert unit_property(scope, "MemorySwapMax") == "0"
        assert Path("/sys/fs/cgroup" + cgroup_line[3:], "memory.max").read_text().strip() == str(48 << 20)
        proc.stdin.write("go\n")
        proc.stdin.flush()

        def ended() -> dict | None:
            return next((r for r in runs_as_root() if r["id"] == run_id and r["ended"]), None)

        run = wait_until(ended, "the budgeted run to be ended", timeout=120)
        assert run["end_reason"] == "exceeded its 48M budget" and run["memory_max"] == 48 << 20
        assert "ate 200 MiB" not in rest_of_output(proc)
        wait_until(lambda: unit_property(scope, "ActiveState") in ("inactive", "failed", ""), "the scope to go")
    finally:
        end(proc)


def test_kill_run_ends_a_run_by_its_scope(daemon, app_user):
    """What the healer does at the grace, asked for by root: the run's own
    scope is killed whole (cgroup.kill), a process that ignores SIGTERM
    and the children it forked included."""
    inner = "trap '' TERM; sleep 300 & sleep 301 & echo $$ ready; wait"
    proc = login(app_user.name, f"{OOM_PROTECT} sh -c {shlex.quote(inner)}")
    try:
        (line,) = read_lines(proc, 1)
        pid = int(line.removesuffix(" ready"))  # oom-protect exec'd the shell: the run's first process
        run = next(r for r in runs_as_root() if r["ended"] is None and r["pid"] == pid)
        assert run["cgroup"].endswith(f"/oomguard-run-{run['id']}.scope")
        r = subprocess.run([str(Path(sys.executable).with_name("oomguard")), "kill-run", str(run["id"])],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert f"run {run['id']}" in r.stdout and "stopped" in r.stdout, r.stdout
        assert proc.wait(60) is not None
        healer = subprocess.run([str(Path(sys.executable).with_name("oomguard")), "events", "--kind", "healer",
                                 "--json"], capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        rec = [e["data"] for e in json.loads(healer.stdout) if e["data"].get("run") == run["id"]][-1]
        assert (rec["action"], rec["method"]) == ("killed", "cgroup.kill"), rec
        done = wait_until(lambda: next((x for x in runs_as_root() if x["id"] == run["id"] and x["ended"]), None),
                          "the run to end")  # fmt: skip
        assert done["end_reason"] == "killed by healer", done
        assert not Path("/sys/fs/cgroup" + run["cgroup"]).exists()
    finally:
        end(proc)


def test_a_screen_run_stays_tracked_in_its_scope_after_the_screen_client_exits(daemon, app_user):
    screendir = app_user.home / ".screen-oomguard"
    proc = login(app_user.name, f"SCREENDIR={shlex.quote(str(screendir))} {OOM_PROTECT} screen -d -m -S imp "
                                "sleep 300; echo detached")  # fmt: skip
    try:
        assert read_lines(proc, 1) == ["detached"]  # the screen client has exited
        run = wait_until(lambda: next((r for r in runs_as_root() if r["ended"] is None and r["user"] == app_user.name
                                       and "screen" in r["command"]), None), "the screen run")  # fmt: skip
        scope = Path("/sys/fs/cgroup" + run["cgroup"])
        sleeper = wait_until(lambda: next((int(p) for p in (scope / "cgroup.procs").read_text().split()
                                           if Path(f"/proc/{p}/comm").read_text().strip() == "sleep"), None),
                             "the sleeper in the run's scope")  # fmt: skip
        assert oom_score_adj(sleeper) == -1000
        time.sleep(2)  # several reaper passes: the run must stay active while its scope holds the session
        assert next(r for r in runs_as_root() if r["id"] == run["id"])["ended"] is None
        r = subprocess.run([OOMGUARD, "kill-run", str(run["id"])], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (r.stdout, r.stderr)
        wait_until(lambda: not scope.exists(), "the run's scope to go")
    finally:
        end(proc)
        subprocess.run(["rm", "-rf", str(screendir)], check=False)


def test_the_sandboxed_daemon_tells_the_runs_terminal_why_it_was_stopped(daemon, app_user):
    """The notice on the run's own terminal, written by the hardened unit
    (no PrivateDevices, so /dev/pts is there for it)."""
    from terminal import Terminal  # tests/guest: a user-owned pty as a login gives it

    tty = Terminal(app_user.uid)
    # setpriv, not runuser: su and runuser run -c commands in a new session, with no terminal at all
    as_user = ["setpriv", f"--reuid={app_user.uid}", f"--regid={app_user.gid}", "--init-groups", "--"]
    proc = tty.popen([*as_user, OOM_PROTECT, "sh", "-c", "echo $$ started; exec sleep 300"],
                     env={"PATH": os.environ["PATH"], "HOME": str(app_user.home), "TERM": "dumb"})  # fmt: skip
    try:
        pid = int(tty.wait_for(r"(\d+) started", timeout=120).group(1))
        run = wait_until(lambda: next((r for r in runs_as_root() if r["pid"] == pid and r["ended"] is None), None),
                         "the run")  # fmt: skip
        assert run["tty"] and run["tty"].startswith("/dev/pts/")
        r = subprocess.run([OOMGUARD, "kill-run", str(run["id"])], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (r.stdout, r.stderr)
        tty.wait_for(rf"oomguard: protected run {run['id']} \([^)]*sleep 300\) was stopped: stopped by an administrator "
                     r"\(oomguard kill-run\)", timeout=60)  # fmt: skip
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        tty.close()


def test_a_refused_scope_falls_back_to_a_plain_cgroup_and_the_run_records_it(daemon, app_user):
    """systemd refuses a scope whose name is taken: the run then gets a plain
    leaf under the caller's own cgroup (never no cgroup), and says why."""
    next_id = json.loads(Path("/var/lib/oomguard/runs.json").read_text())["next_id"]
    names = [f"oomguard-run-{n}.scope" for n in range(next_id, next_id + 3)]  # an id a refusal used up, too
    squatters = [subprocess.Popen(["systemd-run", "--quiet", "--scope", f"--unit={name}", "sleep", "300"])
                 for name in names]  # fmt: skip
    proc = None
    try:
        for name in names:
            wait_until(lambda name=name: unit_property(name, "ActiveState") == "active", f"the squatter {name}")
        inner = "echo $$; cat /proc/self/cgroup; exec sleep 60"
        proc = login(app_user.name, f"{OOM_PROTECT} sh -c {shlex.quote(inner)}")
        pid_line, cgroup_line = read_lines(proc, 2)
        pid = int(pid_line)
        run = next(r for r in runs_as_root() if r["pid"] == pid)
        assert f"oomguard-run-{run['id']}.scope" in names, (run, names)
        m = re.fullmatch(rf"0::(/user\.slice/user-{app_user.uid}\.slice/session-[^/]+\.scope)/oomguard-run-(\d+)",
                         cgroup_line)  # fmt: skip
        assert m and int(m[2]) == run["id"], f"{cgroup_line!r} is not a plain leaf under the session's scope"
        assert run["cgroup"] == cgroup_line[3:] and oom_score_adj(pid) == -1000
        assert run["scope_refused"] and "oomguard-run" in run["scope_refused"], run
        report = subprocess.run([OOMGUARD, "runs", str(run["id"])], capture_output=True, text=True, timeout=60,
                                check=True).stdout  # fmt: skip
        assert "no scope    systemd refused it" in report, report
    finally:
        if proc is not None:
            end(proc)
        for s in squatters:
            s.kill()
            s.wait(30)
