"""Runs the registry lost are found again at start (issue 13): a restarted
daemon re-adopts every live run, by its -1000 processes here (real
processes, their -1000 stood in for: this sandbox cannot lower a value),
and by its cgroup in the guest (tests/guest/test_crash_guest.py)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import pytest

from oomguard.host import procfs
from oomguard.runs.adoption import ADOPTED, Adoption
from oomguard.runs.lifecycle import RunLifecycle
from oomguard.runs.registry import RunRegistry

NOBODY = 65534  # the test's processes are root's here; the owner stands in, as their -1000 does


@pytest.fixture
def tree():
    """A parent with two children and grandchildren, all of one user."""
    code = ("import subprocess, sys, time; "
            "kids = [subprocess.Popen(['sleep', '60']) for _ in range(2)]; "
            "subprocess.Popen(['sh', '-c', 'sleep 61 & exec sleep 62']); print('up', flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "up"
    deadline = time.monotonic() + 30
    # the tree is whole once the shell has forked sleep 61 and become sleep 62
    while [p.comm for p in _family(parent.pid) if p.pid != parent.pid] != ["sleep"] * 4:
        assert time.monotonic() < deadline, _family(parent.pid)
        time.sleep(0.01)
    yield parent
    subprocess.run(["pkill", "-KILL", "-P", str(parent.pid)], check=False)
    parent.kill()
    parent.wait()


def _family(root: int) -> list[procfs.Proc]:
    procs = [p for p in procfs.iter_processes()]
    keep, todo = {root}, [root]
    while todo:
        pid = todo.pop()
        for p in procs:
            if p.ppid == pid and p.pid not in keep:
                keep.add(p.pid)
                todo.append(p.pid)
    return [p for p in procs if p.pid in keep]


def test_loose_minus_1000_processes_become_one_run_per_tree(tmp_path, tree):
    family = _family(tree.pid)
    assert len(family) == 5  # python, 2 sleeps, sleep 61 and the shell that became sleep 62
    protected = [dataclasses.replace(p, oom_score_adj=-1000, uid=NOBODY) for p in family]
    bystander = procfs.snapshot(os.getpid())  # not at -1000: never adopted
    reg = RunRegistry(tmp_path / "runs.json", "boot")
    adopted = Adoption(RunLifecycle(reg), lambda p: True).adopt([*protected, bystander])
    assert len(adopted) == 1
    run = adopted[0]
    assert (run.pid, run.starttime, run.uid) == (tree.pid, family[[p.pid for p in family].index(tree.pid)].starttime,
                                                 NOBODY)  # fmt: skip
    assert run.extra[ADOPTED] == "oom_score_adj" and run.cgroup is None and "python" in run.command
    assert sorted(p for p, _ in reg.members(run)) == sorted(p.pid for p in family if p.pid != tree.pid)
    assert reg.active() == [run]
    # the next start finds them known: nothing adopted twice
    assert Adoption(RunLifecycle(reg), lambda p: True).adopt(protected) == []


def test_what_the_healer_may_not_end_is_not_adopted(tmp_path, tree):
    protected = [dataclasses.replace(p, oom_score_adj=-1000, uid=NOBODY) for p in _family(tree.pid)]
    reg = RunRegistry(tmp_path / "runs.json", "boot")
    root_owned = [dataclasses.replace(p, uid=0) for p in protected]
    assert Adoption(RunLifecycle(reg), lambda p: True).adopt(root_owned) == []  # root's -1000 is root's
    # a parent the healer may not end: each of its children's trees is a run of its own
    runs = Adoption(RunLifecycle(reg), lambda p: p.pid != tree.pid).adopt(protected)
    assert runs and tree.pid not in [r.pid for r in runs]
    assert all(next(p for p in protected if p.pid == r.pid).ppid == tree.pid for r in runs)
