"""The run registry (runs/registry.py and runs/store.py): its indexes, fork
tracking, the bound on ended runs, batched writes off the lock, a full disk,
and the read-only view for commands that only look."""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time

import pytest

from oomguard import config
from oomguard.host import procfs, statefile
from oomguard.policy import rules as policy
from oomguard.runs.lifecycle import RunLifecycle
from oomguard.runs.registry import ReadOnlyRegistry, RunRegistry
from oomguard.runs.run import Run

UID = 1000


def mk(rid: int, pid: int = 0, start: int = 0, cgroup: str | None = None, **kw) -> Run:
    return Run(id=rid, uid=kw.pop("uid", UID), user="u", pid=pid or 4000 + rid, starttime=start or rid,
               started=time.time(), command="import.php", cgroup=cgroup, **kw)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "runs.json"


def on_disk(path) -> list[int]:
    return sorted(r["id"] for r in json.loads(path.read_text())["runs"])


# ---------------------------------------------------------------- lookups


def test_run_of_finds_the_first_process_the_cgroup_subtree_and_members(path):
    reg = RunRegistry(path, "boot")
    first = mk(1, 500, 5000)
    caged = mk(2, 600, 6000, cgroup="/user.slice/oomguard-run-2")
    reg.add(first)
    reg.add(caged)
    reg.on_fork(500, 5000, 501, 5010)
    assert reg.run_of(500, 5000, None) == first
    assert reg.run_of(500, 4999, None) is None  # same pid, other start time: reuse
    assert reg.run_of(501, 5010, "/anywhere") == first
    assert reg.run_of(9, 9, "/user.slice/oomguard-run-2") == caged
    assert reg.run_of(9, 9, "/user.slice/oomguard-run-2/deep/er") == caged
    assert reg.run_of(9, 9, "/user.slice/oomguard-run-20") is None  # a prefix is not a parent
    assert reg.run_of(9, 9, "/user.slice") is None
    assert reg.by_pid(600) == caged and reg.by_pid(601) is None


def test_ended_and_discarded_runs_leave_every_index(path):
    reg = RunRegistry(path, "boot")
    a, b = mk(1, cgroup="/oomguard-run-1"), mk(2)
    reg.add(a)
    reg.add(b)
    reg.on_fork(b.pid, b.starttime, 7000, 70)
    RunLifecycle(reg).end(a.id)
    reg.discard(b.id)
    assert reg.run_of(a.pid, a.starttime, "/oomguard-run-1") is None
    assert reg.by_pid(a.pid) is None and reg.run_of(7000, 70, None) is None
    assert reg.active() == [] and reg.active_count(UID) == 0


def test_members_are_tracked_only_for_runs_without_a_cgroup(path):
    reg = RunRegistry(path, "boot")
    bare, caged = mk(1), mk(2, cgroup="/oomguard-run-2")
    reg.add(bare)
    reg.add(caged)
    reg.on_fork(bare.pid, bare.starttime, 7000, 70)
    reg.on_fork(7000, 70, 7001, 71)  # a grandchild, through the member
    reg.on_fork(caged.pid, caged.starttime, 8000, 80)
    reg.on_fork(123, 1, 9000, 90)  # nobody's
    assert reg.members(bare) == [(7000, 70), (7001, 71)]
    assert reg.members(caged) == []
    assert json.loads(path.read_text())["members"] == [[7000, 70, 1], [7001, 71, 1]]


def test_a_run_its_user_could_move_out_of_its_cgroup_is_followed_and_lives_on(path, tmp_path, monkeypatch):
    from oomguard.host import cgroups
    from oomguard.runs.run import FOLLOW

    root = tmp_path / "cgroup"
    (root / "user.slice" / "shop" / "oomguard-run-1").mkdir(parents=True)
    (root / "plain" / "oomguard-run-2").mkdir(parents=True)
    os.chown(root / "user.slice" / "shop", 1000, 1000)  # delegated, as user@UID.service is
    monkeypatch.setattr(cgroups, "ROOT", root)
    reg = RunRegistry(path, "boot")
    life = RunLifecycle(reg)
    moved = life.begin(mk(1, os.getpid(), procfs.starttime_of(os.getpid()), cgroup="/user.slice/shop/oomguard-run-1"))
    held = life.begin(mk(2, cgroup="/plain/oomguard-run-2"))
    assert moved.extra == {FOLLOW: True} and held.extra == {}
    assert reg.get(1).extra == {FOLLOW: True}
    child = os.fork()
    if child == 0:
        time.sleep(60)
        os._exit(0)
    try:
        reg.on_fork(os.getpid(), procfs.starttime_of(os.getpid()), child, procfs.starttime_of(child))
        reg.on_fork(held.pid, held.starttime, 8000, 80)
        assert [p for p, _ in reg.members(moved)] == [child] and reg.members(held) == []
        # its cgroup (here: not a real one) holds nothing; the member, moved out, lives
        assert reg.alive(reg.get(1)) and child in reg.pids(reg.get(1))
        assert reg.run_of(child, procfs.starttime_of(child), "/user.slice/shop/escaped") == reg.get(1)
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
    life.exited(child, 9)  # its exit event
    assert reg.members(moved) == []


def test_exits_forget_members_through_a_pid_index(path):
    reg = RunRegistry(path, "boot")
    bare = mk(1)
    reg.add(bare)
    for n in range(1000):
        reg.on_fork(bare.pid, bare.starttime, 10_000 + n, n)
    life = RunLifecycle(reg)
    for n in range(0, 1000, 2):
        life.exited(10_000 + n, 0)
    life.exited(123, 0)  # nobody's: nothing changes
    assert reg.members(bare) == [(10_000 + n, n) for n in range(1, 1000, 2)]
    assert sorted(reg._members.pids()) == list(range(10_001, 11_000, 2))


# ---------------------------------------------------------------- the bound


def test_old_ended_runs_are_forgotten_past_the_count_and_the_age(path):
    reg = RunRegistry(path, "boot", keep_ended=3, keep_ended_seconds=3600)
    now = time.time()
    for i in range(1, 7):
        reg.add(mk(i, ended=now - 10 * i, end_reason="exited"))
    reg.add(mk(7, ended=now - 7200, end_reason="exited"))  # too old
    reg.add(mk(8))  # active: never forgotten
    assert reg.forget_ended(now=now) == 5  # 1-4 beyond the newest three, 7 by its age
    assert [r.id for r in reg.all()] == [5, 6, 8]
    assert on_disk(path) == [5, 6, 8]


def test_the_reaper_keeps_the_registry_bounded(path):
    reg = RunRegistry(path, "boot", keep_ended=2)
    life = RunLifecycle(reg)
    for i in range(1, 6):
        reg.add(mk(i))  # pids 4001.. with start times 1..: none of them runs
    ended = life.reap()
    assert [r.id for r in ended] == [1, 2, 3, 4, 5]  # each still handed on for run_end
    assert life.reap() == []
    assert [r.id for r in reg.all()] == [4, 5]


def test_runs_ended_but_not_yet_handed_on_survive_a_restart(path):
    reg = RunRegistry(path, "boot")
    reg.add(mk(1))
    RunLifecycle(reg).end(1, "killed by healer")
    again = RunRegistry(path, "boot")  # the daemon was killed before its run_end
    assert [(r.id, r.end_reason) for r in RunLifecycle(again).reap()] == [(1, "killed by healer")]
    assert RunLifecycle(RunRegistry(path, "boot")).reap() == []


def test_active_runs_of_another_boot_are_ended_and_that_is_written(path):
    reg = RunRegistry(path, "old-boot")
    reg.add(mk(1))
    reg.on_fork(4001, 1, 7000, 70)
    again = RunRegistry(path, "new-boot", deferred=True)
    assert again.get(1).end_reason == "lost at reboot" and again.members(again.get(1)) == []
    assert again.flush()
    assert json.loads(path.read_text())["runs"][0]["end_reason"] == "lost at reboot"


# ---------------------------------------------------------------- writes


def test_forks_and_ends_do_not_touch_the_disk_until_a_flush(path, monkeypatch):
    reg = RunRegistry(path, "boot", deferred=True)
    reg.add(mk(1))
    assert not path.exists()
    fsyncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))
    for i in range(200):
        reg.on_fork(4001, 1, 7000 + i, 70 + i)
    assert fsyncs == [] and not path.exists()
    assert reg.flush()
    assert len(fsyncs) == 2  # the file and its directory, once for all 200 forks
    assert len(json.loads(path.read_text())["members"]) == 200
    assert reg.flush() and len(fsyncs) == 2  # nothing new: nothing written


def test_the_writer_does_not_hold_the_registry_lock_during_disk_io(path, monkeypatch):
    reg = RunRegistry(path, "boot", deferred=True)
    reg.add(mk(1))
    free_during_write = []
    real_write = statefile.write_text_atomic

    def write(p, data):
        # another thread (a grant, a policy write) can take the lock meanwhile
        def try_lock() -> None:
            if reg.lock.acquire(blocking=False):
                reg.lock.release()
                free_during_write.append(True)
            else:
                free_during_write.append(False)

        t = threading.Thread(target=try_lock)
        t.start()
        t.join()
        real_write(p, data)

    monkeypatch.setattr(statefile, "write_text_atomic", write)
    assert reg.flush()
    assert free_during_write == [True]


def test_a_full_disk_keeps_the_state_in_memory_and_retries(path, monkeypatch, caplog):
    reg = RunRegistry(path, "boot", deferred=True)
    reg.add(mk(1))
    assert reg.flush()
    real_write = os.write

    def enospc(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", enospc)
    reg.add(mk(2))
    caplog.set_level(logging.WARNING, logger="oomguard.runs.store")
    assert reg.flush() is False
    assert reg.flush() is False
    assert [r.id for r in reg.all()] == [1, 2]  # still served from memory
    assert on_disk(path) == [1]  # the old file is whole
    assert [p.name for p in path.parent.iterdir()] == ["runs.json"]  # no temp file left
    assert len([r for r in caplog.records if "No space left" in r.getMessage()]) == 1  # rate-limited
    assert reg.writer.failures == 2
    monkeypatch.setattr(os, "write", real_write)
    assert reg.flush()  # space again: the retry writes what memory kept
    assert on_disk(path) == [1, 2]


def test_what_is_written_is_what_a_restart_reads_after_every_change(path):
    reg = RunRegistry(path, "boot", deferred=True)
    reg.add(mk(1, cgroup="/oomguard-run-1", extra={"k": [1]}))
    reg.add(mk(2))
    reg.on_fork(4002, 2, 7000, 70)
    assert reg.flush()
    reg.update(1, peak_memory=123)  # a new version of run 1: encoded again
    RunLifecycle(reg).end(2, "killed by healer")
    assert reg.flush()
    again = RunRegistry(path, "boot")
    assert again.all() == reg.all() and again._next_id == reg._next_id
    assert again.get(1).peak_memory == 123 and again.get(1).extra == {"k": [1]}
    assert [r.id for r in again.take_ended()] == [2]


def test_the_reapers_round_survives_a_full_disk(path, monkeypatch):
    """The daemon's reaper ends runs and then flushes; on ENOSPC neither
    raises (a raise there used to stop the whole daemon)."""
    reg = RunRegistry(path, "boot", deferred=True)
    reg.add(mk(1))

    def full(p, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(statefile, "write_text_atomic", full)
    (ended,) = RunLifecycle(reg).reap()
    assert reg.flush() is False and not reg.get(1).active and ended.id == 1


def test_a_registry_not_deferred_writes_each_change(path):
    reg = RunRegistry(path, "boot")
    reg.add(mk(1))
    assert on_disk(path) == [1]


# ---------------------------------------------------------------- read-only commands


def test_a_read_only_view_reads_and_never_writes(path):
    reg = RunRegistry(path)  # this boot's id, as the view reads it
    reg.add(mk(1, 500, 5000))
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    view = RunRegistry.open_read_only(path)
    assert view.is_protected(500, 5000, None)
    with pytest.raises(ReadOnlyRegistry):
        view.add(mk(2))
    with pytest.raises(ReadOnlyRegistry):
        view.on_fork(500, 5000, 501, 5010)
    assert view.flush()
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_policy_show_does_not_write_the_daemons_runs_file(tmp_path, monkeypatch):
    """A protected run's live child found only by walking the tree: the
    plan skips it, and runs.json is neither rewritten nor opened to write."""
    cfg = config.Config(state_dir=str(tmp_path))
    me = procfs.snapshot(os.getpid())
    path = tmp_path / "runs.json"
    RunRegistry(path).add(Run(1, me.uid, "me", me.ppid, procfs.starttime_of(me.ppid), time.time(), "parent", None))
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, flags, *a, **k: (
        opened.append((str(p), flags)), real_open(p, flags, *a, **k))[1])
    from oomguard.cli.commands import _registry

    decisions = policy.show(cfg, _registry(cfg))
    mine = next(d for d in decisions if d.pid == os.getpid())
    assert mine.reason == policy.PROTECTED
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert not [p for p, flags in opened if "runs.json" in p and flags & (os.O_WRONLY | os.O_RDWR)]


def test_a_fork_whose_parent_exited_before_we_looked_is_still_followed(path):
    reg = RunRegistry(path, "boot")
    bare = mk(1)
    reg.add(bare)
    reg.on_fork(bare.pid, None, 7000, 70)  # the parent's start time could not be read: it exited
    reg.on_fork(7000, None, 7001, 71)  # a member that exited likewise
    assert reg.members(bare) == [(7000, 70), (7001, 71)]
    life = RunLifecycle(reg)
    life.exited(bare.pid, 0)  # the first process's exit, handled
    life.exited(7000, 0)
    reg.on_fork(bare.pid, None, 8000, 80)  # so these pids are other processes now
    reg.on_fork(7000, None, 8001, 81)
    assert reg.members(bare) == [(7001, 71)]


def test_temp_files_of_a_writer_killed_mid_write_are_removed_and_nothing_else(tmp_path):
    for name in (".runs.json.4242.tmp", ".healer.json.77.tmp", f".runs.json.{os.getpid()}.tmp",
                 "runs.json", ".runs.json.x.tmp", "notes.tmp"):  # fmt: skip
        (tmp_path / name).write_text("{}")
    os.symlink("/etc/passwd", tmp_path / ".evil.json.1.tmp")
    assert sorted(statefile.remove_stale_temps(tmp_path)) == [".healer.json.77.tmp", ".runs.json.4242.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".runs.json.{os.getpid()}.tmp", "runs.json", ".runs.json.x.tmp", "notes.tmp", ".evil.json.1.tmp"])
    assert os.path.exists("/etc/passwd")
