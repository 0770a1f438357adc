"""A run's cgroup against the real kernel (runs in the guest): asking again
never nests a second run, and a planted or unmakeable run cgroup is refused
instead of adopted or silently skipped (issue 13)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from daemon_fixture import BIN

OOM_PROTECT = str(BIN / "oom-protect")
EXIT_FAILED = 125  # protect.py: protection could not be obtained


def caller_path(cgroup) -> str:
    return "/" + str(cgroup.path.relative_to("/sys/fs/cgroup"))


def run_in(cgroup, user, daemon, cmd: list[str]) -> tuple[int, str, str]:
    p = cgroup.popen(user.argv(cmd), env=user.env(OOMGUARD_SOCKET=daemon.socket),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=60)
    return p.returncode, out, err


def test_asking_again_gets_the_same_run_and_never_a_nested_cgroup(daemon, unpriv_user, cgroup):
    before = {r["id"] for r in daemon.runs()}
    # oom-protect execs the second oom-protect in its place (same pid, same
    # start time), which asks again; its child then asks from inside the run
    code, out, err = run_in(cgroup, unpriv_user, daemon, [
        OOM_PROTECT, OOM_PROTECT, "sh", "-c",
        f"cat /proc/self/cgroup; {OOM_PROTECT} cat /proc/self/cgroup /proc/self/oom_score_adj",
    ])  # fmt: skip
    assert code == 0, err
    first, second, adj = out.split()
    own = first.removeprefix("0::")
    assert own.startswith(caller_path(cgroup) + "/oomguard-run-")
    assert own.count("oomguard-run-") == 1 and second.removeprefix("0::") == own  # not nested
    assert adj == "-1000"
    new = [r for r in daemon.runs() if r["id"] not in before]
    assert len(new) == 1 and new[0]["cgroup"] == own


def test_a_planted_run_cgroup_is_refused_not_adopted(daemon, unpriv_user, cgroup):
    # the caller's cgroup is delegated to the user, as user@UID.service is
    os.chown(cgroup.path, unpriv_user.uid, unpriv_user.gid)
    before = daemon.runs()
    next_id = max((r["id"] for r in before), default=0) + 1
    planted = [cgroup.path / f"oomguard-run-{i}" for i in range(next_id, next_id + 20)]
    r = unpriv_user.run(["mkdir", *map(str, planted)])
    assert r.returncode == 0, r.stderr
    code, out, err = run_in(cgroup, unpriv_user, daemon, [OOM_PROTECT, "echo", "ran"])
    assert code == EXIT_FAILED and out == "" and "already exists" in err, err
    assert all(Path(p, "cgroup.procs").read_text() == "" for p in planted)  # nothing moved in
    assert [r["id"] for r in daemon.runs()] == [r["id"] for r in before]  # no run recorded


def test_a_cgroup_that_cannot_be_made_refuses_the_grant(daemon, unpriv_user, cgroup):
    cgroup.write("cgroup.max.descendants", 0)  # the kernel now refuses any mkdir below
    before = daemon.runs()
    code, out, err = run_in(cgroup, unpriv_user, daemon, [OOM_PROTECT, "echo", "ran"])
    assert code == EXIT_FAILED and out == "" and "cannot create the run's cgroup" in err, err
    assert [r["id"] for r in daemon.runs()] == [r["id"] for r in before]
    assert "refused protection" in daemon.log_text()
