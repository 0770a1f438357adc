"""The enforcer at scale: per-event work indexed by pid, resyncs only when
events were lost or asked for, and exec storms that cost little."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from oomguard.config import parse_policy_class
from oomguard.host import procevents, procfs
from oomguard.host.proctable import ProcTable
from oomguard.policy import enforcer
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


def _booked(enf: Enforcer, n: int = N, first: int = 4_000_000) -> tuple[Spy, Spy]:
    """The same processes in the enforcer's book of values, one in seven at
    -1000, and spies on its two dicts."""
    for i in range(n):
        enf.adj.note((first + i, 1000 + i), -1000 if i % 7 == 0 else 0)
    book = enf.adj
    book._adj, book._protected = Spy(book._adj), Spy(book._protected)
    return book._adj, book._protected


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
    values, protected = _booked(enf)
    pid, other = 4_000_007, 4_000_014  # both at -1000 in the book
    enf.on_exit(pid, 0)
    enf.handle(("exit", pid, 0))  # the stream's path too
    assert spy.touched == {pid} and values.touched == {pid} and protected.touched <= {pid}
    assert pid not in spy and len(enf.table) == N - 1  # both of its entries, nothing else
    assert enf.adj.get((pid, 1007)) is None and enf.adj.get((other, 1014)) == -1000 and len(enf.adj) == N - 1


def test_an_exec_among_10k_known_processes_touches_that_pid_only() -> None:
    enf = Enforcer(_classes(), None, self_pid=0)
    spy = _known(enf)
    values, protected = _booked(enf)
    pid = 4_000_011
    assert enf.on_exec(pid) is None  # no such process: forgotten, nothing looked up
    assert spy.touched == {pid} and len(enf.table) == N  # its one entry of N + 1
    assert not values.touched and not protected.touched  # its value stays until its look or exit


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


# ---------------------------------------------------------------- resyncs


def _upkeep(enf: Enforcer, *args) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    t = threading.Thread(target=enf.run_upkeep, args=(stop, *args), daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while not enf._upkeep_running:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    return stop, t


def _until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_in_event_mode_no_timer_walks_proc(monkeypatch) -> None:
    monkeypatch.setattr(enforcer, "IDLE_WAKE", 0.005)  # 60 idle wakeups below, not 0.3
    walks = []
    enf = Enforcer(_classes(), None, self_pid=0, delay=0.02)
    monkeypatch.setattr(enf, "_walk", lambda: walks.append(time.monotonic()) or [])
    stop, t = _upkeep(enf)
    time.sleep(0.3)
    assert walks == []
    enf.request_resync()  # when asked: at once
    _until(lambda: len(walks) == 1)
    enf.classes = _classes(600)  # new classes: the running processes need them too
    _until(lambda: len(walks) == 2)
    stop.set()
    t.join(5)
    # the same loop with a period does walk: what the assertion above would catch
    periodic = Enforcer(_classes(), None, self_pid=0, delay=0.02)
    monkeypatch.setattr(periodic, "_walk", lambda: walks.append(time.monotonic()) or [])
    stop, t = _upkeep(periodic, 0.05)
    _until(lambda: len(walks) >= 4)
    stop.set()
    t.join(5)


def test_lost_events_are_resynced_by_the_upkeep_thread_not_the_event_thread(monkeypatch) -> None:
    enf = Enforcer(_classes(), None, self_pid=0, delay=0.02)
    event_thread = threading.get_ident()
    walked_in = []
    monkeypatch.setattr(enf, "_walk", lambda: walked_in.append(threading.get_ident()) or [])
    stop, t = _upkeep(enf)
    enf.handle(("lost",))
    assert walked_in == []  # handle returned at once: the socket goes on being drained
    _until(lambda: walked_in)
    stop.set()
    t.join(5)
    assert walked_in[0] != event_thread and enf.stats.lost == 1


@pytest.mark.skipif(not procevents.available(), reason="needs root and the process-event connector")
def test_an_overrun_of_the_real_connector_makes_the_enforcer_resync(monkeypatch) -> None:
    enf = Enforcer(_classes(), None, self_pid=0, delay=0.02)
    walks = []
    monkeypatch.setattr(enf, "_walk", lambda: walks.append(1) or [])
    pe = procevents.ProcEvents(rcvbuf=4096)
    pe.open()
    assert pe.sock is not None
    pe.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # ENOBUFS on the next storm
    for _ in range(5):
        subprocess.run(["/bin/sh", "-c", "for i in $(seq 60); do /bin/true; done"], check=True)
    stop, t = _upkeep(enf)
    events = threading.Thread(target=pe.run, args=(enf.handle, stop), daemon=True)
    events.start()
    try:
        _until(lambda: enf.stats.lost >= 1 and walks, timeout=30)
    finally:
        stop.set()
        t.join(5)
        events.join(10)


def test_a_walk_runs_off_the_lock_and_leaves_what_events_touched_to_them(monkeypatch, sleeper) -> None:
    """Events are handled while /proc is walked; a process an event looked at
    meanwhile keeps what the event decided (its look is newer)."""
    enf = Enforcer(_classes(600), None, self_pid=0)
    a = subprocess.Popen([str(sleeper), "60"])
    try:
        _until(lambda: procfs.read_stat(a.pid).comm == sleeper.name[:15])
        during, fired = [], []
        real = enforcer.procfs.snapshot

        def snapshot(pid):
            if pid == a.pid and not fired:
                fired.append(pid)
                # in the middle of the walk, from another thread: an event
                ev = threading.Thread(target=lambda: during.append(enf.on_exec(a.pid)))
                ev.start()
                ev.join(5)
                assert not ev.is_alive(), "the event waited for the walk"
            return real(pid)

        monkeypatch.setattr(enforcer.procfs, "snapshot", snapshot)
        changes = enf.resync()
        assert during[0].class_name == "oomgscale" and procfs.read_oom_score_adj(a.pid) == 600
        assert a.pid not in [c.pid for c in changes]  # written once, by the event
        assert enf.table.latest(a.pid)[1].name == "oomgscale"
    finally:
        a.kill()
        a.wait()


# ---------------------------------------------------------------- exec storms


def test_a_process_that_exits_before_its_look_costs_no_read(monkeypatch) -> None:
    enf = Enforcer(_classes(), None, self_pid=0, delay=10.0)
    enf._upkeep_running = True  # as while run_upkeep runs; drained by hand below
    read = []
    monkeypatch.setattr(enforcer.procfs, "snapshot", lambda pid: read.append(pid))
    monkeypatch.setattr(enforcer.procfs, "starttime_of", lambda pid: read.append(pid))
    for pid in range(5_000_000, 5_000_100):
        enf.handle(("fork", os.getpid(), pid))
        enf.handle(("exec", pid))
        enf.handle(("exit", pid, 0))
    assert enf.process_due(time.monotonic() + 11) == 0
    assert read == [] and enf.stats.dropped == 100 and enf.stats.writes == 0
    assert len(enf._pending) == 0 and len(enf.table) == 0


def test_all_events_of_one_process_make_one_look(monkeypatch, sleeper) -> None:
    enf = Enforcer(_classes(600), None, self_pid=0, delay=10.0)
    enf._upkeep_running = True
    a = subprocess.Popen([str(sleeper), "60"])
    try:
        _until(lambda: procfs.read_stat(a.pid).comm == sleeper.name[:15])
        looked = []
        real = enforcer.procfs.snapshot
        monkeypatch.setattr(enforcer.procfs, "snapshot", lambda pid: looked.append(pid) or real(pid))
        enf.handle(("fork", os.getpid(), a.pid))
        enf.handle(("exec", a.pid))
        enf.handle(("uid", a.pid, 0, 0))
        assert procfs.read_oom_score_adj(a.pid) == 0 and looked == []  # not due yet
        assert enf.process_due(time.monotonic() + 11) == 1
        assert looked == [a.pid] and procfs.read_oom_score_adj(a.pid) == 600
        assert len(enf._settle) == 1  # a fork: a second look once settled
    finally:
        a.kill()
        a.wait()


def test_long_lived_processes_started_in_a_storm_get_their_value(tmp_path, sleeper) -> None:
    """Real processes under a storm of short-lived ones, all through the event
    path with its delay: each long-lived one gets its class value, while the
    short-lived ones cost no look."""
    true = tmp_path / "oomgscale-t"
    shutil.copy2(shutil.which("true"), true)
    enf = Enforcer(_classes(700), None, self_pid=0, delay=0.05)
    stop, t = _upkeep(enf)
    pe = None
    if procevents.available():
        pe = procevents.ProcEvents()
        pe.open()
        feeder = threading.Thread(target=pe.run, args=(enf.handle, stop), daemon=True)
        feeder.start()
    longs, shorts = [], 0
    try:
        for i in range(300):
            p = subprocess.Popen([str(true)])
            if pe is None:  # no connector: the events it would have sent
                enf.handle(("fork", os.getpid(), p.pid))
                enf.handle(("exec", p.pid))
            p.wait()
            if pe is None:
                enf.handle(("exit", p.pid, 0))
            shorts += 1
            if i % 30 == 0:
                q = subprocess.Popen([str(sleeper), "60"])
                if pe is None:
                    enf.handle(("fork", os.getpid(), q.pid))
                    enf.handle(("exec", q.pid))
                longs.append(q)
        _until(lambda: all(procfs.read_oom_score_adj(q.pid) == 700 for q in longs))
        assert len(longs) == 10
        assert enf.stats.dropped >= shorts // 2  # most short-lived ones never looked at
        assert enf.stats.looks < len(longs) * 2 + shorts // 2
    finally:
        stop.set()
        t.join(5)
        for q in longs:
            q.kill()
            q.wait()


def test_polling_keeps_its_periodic_walk_and_walks_once_for_new_classes(monkeypatch) -> None:
    enf = Enforcer(_classes(), None, self_pid=0, full_sweep_every=3)
    fulls = []
    real = enf._walk
    monkeypatch.setattr(enf, "_walk", lambda: fulls.append(enf.stats.polls) or real())
    for _ in range(7):
        enf.poll_once()
    assert fulls == [1, 4, 7]  # no events to follow: /proc on a timer, as before
    enf.classes = _classes(600)
    enf.poll_once()
    enf.poll_once()
    assert fulls == [1, 4, 7, 8]


def test_a_queued_fork_still_tells_the_registry_at_once(tmp_path, sleeper) -> None:
    """The look waits; the run's membership does not: a protected run's child
    is a member before anything looks at it, and is never written."""
    from oomguard.runs.registry import Run, RunRegistry

    me = procfs.snapshot(os.getpid())
    reg = RunRegistry(tmp_path / "runs.json", boot_id="test-boot")
    reg.add(Run(id=1, uid=me.uid, user="u", pid=me.pid, starttime=me.starttime, started=time.time(),
                command="t", cgroup=None))  # cgroup-less: followed through forks
    enf = Enforcer(_classes(600), reg, self_pid=0, delay=10.0)
    enf._upkeep_running = True
    a = subprocess.Popen([str(sleeper), "60"])
    try:
        _until(lambda: procfs.read_stat(a.pid).comm == sleeper.name[:15])
        enf.handle(("fork", os.getpid(), a.pid))
        assert reg.is_protected(a.pid, procfs.starttime_of(a.pid), None)  # before the look
        assert enf.process_due(time.monotonic() + 11) == 1
        assert procfs.read_oom_score_adj(a.pid) == 0 and enf.stats.writes == 0
    finally:
        a.kill()
        a.wait()


def test_looks_go_on_while_proc_is_walked(monkeypatch, sleeper) -> None:
    enf = Enforcer(_classes(600), None, self_pid=0, delay=0.02)
    release, walking = threading.Event(), threading.Event()

    def slow_walk():
        walking.set()
        release.wait(10)  # a walk of a very big box
        return []

    monkeypatch.setattr(enf, "_walk", slow_walk)
    stop, t = _upkeep(enf)
    a = subprocess.Popen([str(sleeper), "60"])
    try:
        enf.request_resync()
        assert walking.wait(5)
        _until(lambda: procfs.read_stat(a.pid).comm == sleeper.name[:15])
        enf.handle(("exec", a.pid))
        _until(lambda: procfs.read_oom_score_adj(a.pid) == 600, timeout=5)  # the walk still runs
        assert not release.is_set()
    finally:
        release.set()
        stop.set()
        t.join(5)
        a.kill()
        a.wait()
