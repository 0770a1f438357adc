"""Protection that must not escape the healer (issue 13), against the real
kernel: a child the user moves out of the run's cgroup (the caller's cgroup
delegated to them, as user@UID.service is), the user's own copy of the
database's binary, and a fork chain in a run that cgroup.kill cannot take
whole. In each case `oomguard kill-run` ends what is the user's and says
truly what it did."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from daemon_fixture import BIN, wait_for

OOM_PROTECT = str(BIN / "oom-protect")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone between the listing and the read
        return False


def adj(pid: int) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


def cgroup_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text().strip().removeprefix("0::")


def run_of(daemon, pid: int) -> dict:
    return wait_for(lambda: next((r for r in daemon.runs() if r["pid"] == pid), None), timeout=30)


def start_run(daemon, user, cgroup, script: str) -> subprocess.Popen:
    return cgroup.popen(user.argv([OOM_PROTECT, "sh", "-c", script]),
                        env=user.env(OOMGUARD_SOCKET=daemon.socket), stdout=subprocess.PIPE, text=True)  # fmt: skip


def test_a_child_moved_out_of_its_run_stays_in_the_run_and_ends_with_it(daemon, unpriv_user, cgroup):
    for name in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
        os.chown(cgroup.path / name, unpriv_user.uid, unpriv_user.gid)  # delegated
    escape = cgroup.path / "escape"
    p = start_run(daemon, unpriv_user, cgroup,
                  f"mkdir {escape}; sleep 300 </dev/null >/dev/null 2>&1 & echo $! > {escape}/cgroup.procs; echo $!")  # fmt: skip
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0
    child = int(out)
    caller = "/" + str(cgroup.path.relative_to("/sys/fs/cgroup"))
    assert cgroup_of(child) == caller + "/escape" and adj(child) == -1000  # out of the run's cgroup
    run = wait_for(lambda: (r := run_of(daemon, p.pid))["exit_status"] is not None and r, timeout=30)
    assert run["exit_status"] == 0  # its first process is gone, its cgroup empty
    # A run that ends by itself meanwhile shows the reaper has looked since.
    q = start_run(daemon, unpriv_user, cgroup, "true")
    q.communicate(timeout=60)
    wait_for(lambda: run_of(daemon, q.pid)["ended"], timeout=30)
    assert run_of(daemon, p.pid)["ended"] is None  # never ended while its child lives
    r = daemon.cli("kill-run", str(run["id"]), check=False)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not alive(child), timeout=30)
    ended = run_of(daemon, p.pid)
    assert ended["ended"] and ended["end_reason"] == "killed by healer"


def test_the_users_own_mariadbd_is_not_the_database_and_is_ended(daemon, unpriv_user, cgroup):
    # The system's binary as the user: blocked on a pipe nobody reads (its
    # help is ~190 KB), so it lives, with /usr/sbin/mariadbd as its exe.
    p = start_run(daemon, unpriv_user, cgroup,
                  "/usr/sbin/mariadbd --no-defaults --help --verbose | sleep 300")  # fmt: skip
    run = run_of(daemon, p.pid)
    cg = Path("/sys/fs/cgroup" + run["cgroup"])

    def mariadbd():
        for pid in map(int, (cg / "cgroup.procs").read_text().split()):
            try:
                if os.readlink(f"/proc/{pid}/exe") == "/usr/sbin/mariadbd":
                    return pid
            except FileNotFoundError:
                pass
        return None

    db = wait_for(mariadbd, timeout=30)
    assert adj(db) == -1000 and os.stat(f"/proc/{db}").st_uid == unpriv_user.uid
    r = daemon.cli("kill-run", str(run["id"]), check=False)
    assert r.returncode == 0, (r.stdout, r.stderr)  # "stopped", nothing spared as "the database"
    wait_for(lambda: not alive(db), timeout=30)
    p.wait(timeout=30)
    assert run_of(daemon, p.pid)["end_reason"] == "killed by healer"


CHAIN = "import os\nwhile True:\n    if os.fork():\n        os._exit(0)\n"  # a new pid, over and over


def test_a_fork_chain_is_caught_when_cgroup_kill_cannot_be_used(daemon, unpriv_user, cgroup):
    p = start_run(daemon, unpriv_user, cgroup, f"python3 -c '{CHAIN}' & echo started; exec sleep 300")
    assert p.stdout.readline().strip() == "started"
    run = run_of(daemon, p.pid)
    cg = Path("/sys/fs/cgroup" + run["cgroup"])
    # root's process in the run's cgroup: cgroup.kill would take it too, so
    # the healer must go process by process, which a fork chain outruns
    # unless the cgroup is frozen first
    roots = subprocess.Popen(["sleep", "300"])
    (cg / "cgroup.procs").write_text(str(roots.pid))

    def chain_running():
        pids = [int(x) for x in (cg / "cgroup.procs").read_text().split()]
        return [x for x in pids if x not in (p.pid, roots.pid) and alive(x)]

    first = wait_for(chain_running, timeout=30)
    assert wait_for(lambda: (now := chain_running()) and now != first, timeout=30)  # it moves on
    r = daemon.cli("kill-run", str(run["id"]), check=False)
    try:
        # root's sleep is spared, so the run is not fully stopped, and says so
        assert r.returncode != 0 and "not fully stopped: spared_some" in r.stderr, (r.stdout, r.stderr)
        assert chain_running() == [] and alive(roots.pid)
        assert (cg / "cgroup.freeze").read_text().strip() == "0"  # thawed: what is spared runs on
        assert p.wait(timeout=30) in (-15, -9)  # the run's own processes are gone (SIGTERM or SIGKILL)
        log = daemon.log_text()
        assert "spared_some via pidfd+freeze" in log, log[-2000:]
    finally:
        roots.kill()
        roots.wait()
