"""The broker's loop never waits: queries in a fair, capped pool
(broker/workers.py), and a systemd placement off the loop; real sockets."""

from __future__ import annotations

import os
import threading

import pytest
from broker_rig import Rig, ask, ask_as_nobody, connect

from oomguard.broker import placement
from oomguard.broker.workers import WorkerPool
from oomguard.host import procfs, scope
from oomguard.runs import lifecycle
from oomguard.runs.views import run_view


def test_a_uid_past_its_cap_is_refused_and_the_job_is_not_queued() -> None:
    pool = WorkerPool("t", threads=2, per_uid=2)
    gate = threading.Event()
    try:
        assert pool.submit(1, gate.wait) and pool.submit(1, gate.wait)
        assert not pool.submit(1, lambda: None)
        assert pool.submit(2, lambda: None)  # another uid is not affected
        assert pool.load(1) == 2
    finally:
        gate.set()
        pool.stop()
    assert pool.load(1) == 0 and not pool.submit(1, lambda: None)  # stopped: takes nothing


def test_queued_jobs_take_turns_across_uids() -> None:
    pool = WorkerPool("t", threads=1, per_uid=3)
    order: list[str] = []
    started, gate = threading.Event(), threading.Event()

    def first() -> None:
        started.set()
        gate.wait()
        order.append("a1")

    assert pool.submit(1, first)
    assert started.wait(5)
    for name in ("a2", "a3"):
        assert pool.submit(1, lambda name=name: order.append(name))
    assert pool.submit(2, lambda: order.append("b1"))
    gate.set()
    pool.stop()
    assert order == ["a1", "a2", "b1", "a3"]  # first come, but b1 before a's third


def test_a_result_is_delivered_after_the_slot_is_free() -> None:
    """So a client that got its reply may ask again at once without BUSY."""
    pool = WorkerPool("t", threads=1, per_uid=1)
    delivered = threading.Event()
    seen = []
    assert pool.submit(1, lambda: 42, lambda r: (seen.append((r, pool.load(1))), delivered.set()))
    assert delivered.wait(5)
    assert seen == [(42, 0)] and pool.submit(1, lambda: None)
    pool.stop()


def test_a_failing_job_does_not_end_its_thread() -> None:
    pool = WorkerPool("t", threads=1, per_uid=1)
    done = threading.Event()
    assert pool.submit(1, lambda: 1 / 0)
    while not pool.submit(1, done.set):  # the failed job frees its slot
        pass
    assert done.wait(5)
    pool.stop()


def test_queries_leave_the_loop_and_one_users_flood_is_busy_not_blocking(rig: Rig) -> None:
    gate = threading.Event()
    running = threading.Semaphore(0)

    def block(peer, request):
        running.release()
        gate.wait(10)
        return {"blocked": True}

    b = rig.start({"block": block, "echo": lambda peer, req: {"uid": peer.uid}})
    path = b.config.socket
    held = [connect(path) for _ in range(2)]
    try:
        for s in held:
            s.sendall(b'{"op": "block"}\n')
        assert running.acquire(timeout=5) and running.acquire(timeout=5)
        # root's two queries hold their share of the pool: a third is BUSY ...
        reply = ask(path, {"op": "echo"})
        assert reply["ok"] is False and "busy" in reply["error"]
        assert rig.refusals[-1][:2] == (0, "busy")
        # ... while ping is answered on the loop, and another user's query runs
        assert ask(path, {"op": "ping"}) == {"ok": True, "uid": 0}
        assert ask_as_nobody(path, {"op": "echo"}) == {"ok": True, "uid": 65534}
    finally:
        gate.set()
    for s in held:
        assert s.makefile("rb").readline() == b'{"ok": true, "blocked": true}\n'
        s.close()


def test_a_systemd_placement_runs_off_the_loop_and_the_reply_waits_for_it(rig: Rig, monkeypatch) -> None:
    writes = []
    monkeypatch.setattr(procfs, "write_oom_score_adj", lambda value, pid="self", dir_fd=None: writes.append(value))
    monkeypatch.setattr(placement, "plan", lambda run_id, pid, cg, memory_max=None: placement.Placement(
        run_id, pid, "/user.slice/user-0.slice/session-1.scope", scope_slice="user-0.slice"))
    asked, gate = threading.Event(), threading.Event()

    def slow_scope(name, pid, slice_, description, memory_max=None):
        asked.set()
        gate.wait(10)
        return None  # systemd made it

    monkeypatch.setattr(scope, "start_scope", slow_scope)
    b = rig.start(allow_uids=frozenset({os.getuid()}))
    s = connect(b.config.socket)
    try:
        s.sendall(b'{"op": "protect", "v": 1}\n')
        assert asked.wait(5)
        assert ask(b.config.socket, {"op": "ping"})["ok"]  # the loop serves meanwhile
        s.setblocking(False)
        with pytest.raises(BlockingIOError):
            s.recv(1)  # not placed yet, so no reply yet: the client must not exec
        assert writes == []  # and no -1000 before the placement
    finally:
        gate.set()
    s.setblocking(True)
    reply = s.makefile("rb").readline()
    s.close()
    assert reply.startswith(b'{"ok": true, "run": 1, "cgroup": "/user.slice/user-0.slice/oomguard-run-1.scope"')
    assert writes == [-1000]


def test_a_refused_scope_falls_back_to_a_leaf_cgroup_and_the_run_says_why(rig: Rig, monkeypatch) -> None:
    monkeypatch.setattr(procfs, "write_oom_score_adj", lambda value, pid="self", dir_fd=None: None)
    monkeypatch.setattr(placement, "plan", lambda run_id, pid, cg, memory_max=None: placement.Placement(
        run_id, pid, "/user.slice/user-0.slice/session-1.scope", scope_slice="user-0.slice"))
    monkeypatch.setattr(scope, "start_scope", lambda *a, **kw: "Unit oomguard-run-1.scope was already loaded")
    made = []

    def leaf(run_id, pid, parent, memory_max=None):
        made.append(parent)
        return f"{parent}/oomguard-run-{run_id}"

    monkeypatch.setattr(lifecycle, "make_cgroup", leaf)
    b = rig.start(allow_uids=frozenset({os.getuid()}))
    reply = ask(b.config.socket, {"op": "protect", "v": 1})
    assert reply["ok"] and reply["cgroup"] == "/user.slice/user-0.slice/session-1.scope/oomguard-run-1", reply
    assert made == ["/user.slice/user-0.slice/session-1.scope"]  # a plain leaf under the caller's own
    run = b.granter.registry.get(reply["run"])
    assert run_view(run)["scope_refused"] == "Unit oomguard-run-1.scope was already loaded"


def test_neither_a_scope_nor_a_leaf_is_no_grant(rig: Rig, monkeypatch) -> None:
    writes = []
    monkeypatch.setattr(procfs, "write_oom_score_adj", lambda value, pid="self", dir_fd=None: writes.append(value))
    monkeypatch.setattr(placement, "plan", lambda run_id, pid, cg, memory_max=None: placement.Placement(
        run_id, pid, "/user.slice/user-0.slice/session-1.scope", scope_slice="user-0.slice"))
    monkeypatch.setattr(scope, "start_scope", lambda *a, **kw: "Access denied")
    monkeypatch.setattr(lifecycle, "make_cgroup", lambda run_id, pid, parent, memory_max=None: None)  # the move failed
    b = rig.start(allow_uids=frozenset({os.getuid()}))
    reply = ask(b.config.socket, {"op": "protect", "v": 1})
    assert not reply["ok"] and "systemd refused the run a scope (Access denied)" in reply["error"], reply
    assert writes == []
