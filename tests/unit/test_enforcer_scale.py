"""The enforcer at scale: per-event work indexed by pid, resyncs only when
events were lost or asked for, and exec storms that cost little."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from oomguard.config import parse_policy_class
from oomguard.host import procfs
from oomguard.host.proctable import ProcTable
from oomguard.policy.enforcer import Enforcer

N = 10_000


def _classes(adj: int = 500) -> tuple:
    return (parse_policy_class({"name": "oomgscale", "oom_score_adj": adj, "comm": ["oomgscale-*"]}, "t"),)


class Spy(dict):
    """A ProcTable's pid index that records which pids were asked about and
    refuses to be walked: an event that scanned every process would fail."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.touched: set[int] = set()

    def _walk(self, *_a, **_kw):
        raise AssertionError("an event walked every known process")

    __iter__ = keys = items = values = _walk  # type: ignore[assignment]

    def get(self, k, default=None):
        self.touched.add(k)
        return super().get(k, default)

    def pop(self, k, *default):
        self.touched.add(k)
        return super().pop(k, *default)

    def setdefault(self, k, default=None):
        self.touched.add(k)
        return super().setdefault(k, default)

    def __getitem__(self, k):
        self.touched.add(k)
        return super().__getitem__(k)

    def __contains__(self, k):
        self.touched.add(k)
        return super().__contains__(k)


def _known(enf: Enforcer, n: int = N, first: int = 4_000_000) -> Spy:
    """``n`` remembered processes at pids no real process has, and a spy on the index."""
    cls = enf.classes[0]
    for i in range(n):
        enf.table[(first + i, 1000 + i)] = cls if i % 2 else None
    enf.table[(first + 7, 5)] = cls  # an earlier process that had the same pid
    spy = Spy(enf.table._by_pid)
    enf.table._by_pid = spy
    return spy


@pytest.fixture(scope="module")
def sleeper(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bin") / f"oomgscale-{os.getpid() % 10000}"
    shutil.copy2(shutil.which("sleep"), path)
    return path


def test_the_table_is_a_mapping_indexed_by_pid() -> None:
    t: ProcTable[str] = ProcTable()
    t[(5, 100)] = "a"
    t[(5, 200)] = "b"
    t[(6, 100)] = "c"
    assert len(t) == 3 and (5, 200) in t and (5, 300) not in t and "x" not in t
    assert t.latest(5) == (200, "b") and t.latest(5, upto=150) == (100, "a") and t.latest(5, upto=50) is None
    assert t.pop((6, 100)) == "c" and 6 not in t.pids() and len(t) == 2
    assert t.forget(5) == 2 and len(t) == 0 and t.latest(5) is None and t.forget(5) == 0
    t[(1, 1)] = "z"
    holder = t
    t.replace({(2, 2): "y"})
    assert holder is t and dict(t) == {(2, 2): "y"}


def test_an_exit_among_10k_known_processes_touches_that_pid_only() -> None:
    enf = Enforcer(_classes(), None, self_pid=0)
    spy = _known(enf)
    pid = 4_000_007
    enf.on_exit(pid, 0)
    enf.handle(("exit", pid, 0))  # the stream's path too
    assert spy.touched == {pid}
    assert pid not in spy and len(enf.table) == N - 1  # both of its entries, nothing else


def test_an_exec_among_10k_known_processes_touches_that_pid_only() -> None:
    enf = Enforcer(_classes(), None, self_pid=0)
    spy = _known(enf)
    pid = 4_000_011
    assert enf.on_exec(pid) is None  # no such process: forgotten, nothing looked up
    assert spy.touched == {pid} and len(enf.table) == N  # its one entry of N + 1


def test_a_fork_among_10k_known_processes_asks_only_about_its_own_family(sleeper) -> None:
    enf = Enforcer(_classes(600), None, self_pid=0)
    child = subprocess.Popen([str(sleeper), "60"])
    try:
        while procfs.read_stat(child.pid).comm != sleeper.name[:15]:
            pass
        spy = _known(enf)
        d = enf.on_fork(os.getpid(), child.pid)
        assert (d.class_name, procfs.read_oom_score_adj(child.pid)) == ("oomgscale", 600)
        family = {child.pid, os.getpid()}
        p = os.getpid()
        while p > 1:  # the resolver may ask about ancestors, never about strangers
            p = procfs.read_stat(p).ppid
            family.add(p)
        assert spy.touched <= family, spy.touched - family
        assert len(enf.table) == N + 1 + 1  # everyone kept, the child learned
    finally:
        child.kill()
        child.wait()
