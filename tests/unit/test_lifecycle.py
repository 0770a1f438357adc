"""A run's life (runs/lifecycle.py): begin, member, end and reap, on a fake
cgroup tree (a plain directory: the host's own cgroupfs is not touched), and
the grant's use of it with real peers. The -1000 write needs
CAP_SYS_RESOURCE, which this host lacks, so it is recorded instead of done
here; the guest proves the real write and real cgroups."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from oomguard import broker, config
from oomguard.broker import Granter, Peer, Refusal
from oomguard.host import cgroups, procfs
from oomguard.runs import lifecycle
from oomguard.runs.lifecycle import EXITED, RunLifecycle, RunRefused
from oomguard.runs.registry import RunRegistry
from oomguard.runs.run import Run
from oomguard.telemetry.reasons import RefusalReason

UID = 1000


@pytest.fixture
def cgroupfs(tmp_path, monkeypatch):
    """A cgroup v2 tree in a plain directory. Moving a pid appends it to the
    cgroup's cgroup.procs, as the kernel would show it."""
    root = tmp_path / "cgroupfs"
    root.mkdir()
    (root / "cgroup.controllers").write_text("memory pids\n")
    monkeypatch.setattr(cgroups, "ROOT", root)

    def move(pid: int, cg: str) -> None:
        with open(cgroups.path(cg) / "cgroup.procs", "a") as f:
            f.write(f"{pid}\n")

    real_remove = cgroups.remove

    def remove(cg: str) -> bool:
        # The kernel rmdirs a cgroup with its interface files; a directory does not.
        for dirpath, _dirs, files in os.walk(cgroups.path(cg)):
            for name in files:
                os.unlink(os.path.join(dirpath, name))
        return real_remove(cg)

    monkeypatch.setattr(cgroups, "move", move)
    monkeypatch.setattr(cgroups, "remove", remove)
    return root


@pytest.fixture
def reg(tmp_path):
    return RunRegistry(tmp_path / "runs.json", "boot")


def run(reg: RunRegistry, pid: int = 4000, start: int = 40, uid: int = UID, cgroup: str | None = None, **kw) -> Run:
    r = Run(id=reg.new_id(), uid=uid, user=f"u{uid}", pid=pid, starttime=start, started=time.time(),
            command="import.php", cgroup=cgroup, **kw)
    RunLifecycle(reg).begin(r)
    return r


# ---------------------------------------------------------------- the run's cgroup


def test_make_cgroup_creates_the_runs_own_cgroup_and_moves_the_process_in(cgroupfs):
    (cgroupfs / "user.slice").mkdir()
    cg = lifecycle.make_cgroup(7, 4242, "/user.slice")
    assert cg == "/user.slice/oomguard-run-7"
    assert (cgroupfs / "user.slice" / "oomguard-run-7" / "cgroup.procs").read_text() == "4242\n"


def test_a_planted_run_cgroup_is_refused_and_left_as_it_was(cgroupfs):
    planted = cgroupfs / "user.slice" / "oomguard-run-7"
    planted.mkdir(parents=True)
    (planted / "cgroup.procs").write_text("666\n")
    with pytest.raises(RunRefused) as e:
        lifecycle.make_cgroup(7, 4242, "/user.slice")
    assert e.value.reason == RefusalReason.ERROR and "already exists" in str(e.value)
    assert (planted / "cgroup.procs").read_text() == "666\n"  # not adopted, nothing moved in


def test_an_empty_run_cgroup_a_crash_left_is_made_again(cgroupfs):
    """A daemon killed between the mkdir and saving the run id hands the id
    out again: its empty, root-made leaf is ours, not planted."""
    leftover = cgroupfs / "user.slice" / "oomguard-run-7"
    leftover.mkdir(parents=True)
    assert lifecycle.make_cgroup(7, 4242, "/user.slice") == "/user.slice/oomguard-run-7"
    assert (leftover / "cgroup.procs").read_text() == "4242\n"


def test_an_empty_run_cgroup_a_user_made_is_still_refused(cgroupfs):
    (cgroupfs / "user.slice").mkdir()
    planted = cgroupfs / "user.slice" / "oomguard-run-7"
    planted.mkdir()
    os.chown(planted, 65534, 65534)
    with pytest.raises(RunRefused, match="already exists"):
        lifecycle.make_cgroup(7, 4242, "/user.slice")
    assert planted.exists() and not (planted / "cgroup.procs").exists()


def test_a_failing_mkdir_is_refused_not_ignored(cgroupfs):
    # as with cgroup.max.descendants=0, the kernel refuses the mkdir
    with pytest.raises(RunRefused) as e:
        lifecycle.make_cgroup(7, 4242, "/no-such-parent")
    assert e.value.reason == RefusalReason.ERROR and "cannot create" in str(e.value)


def test_a_failing_move_leaves_the_run_without_a_cgroup_and_removes_it(cgroupfs, monkeypatch):
    def refuse(pid, cg):
        raise ProcessLookupError(3, "No such process")

    monkeypatch.setattr(cgroups, "move", refuse)
    assert lifecycle.make_cgroup(7, 4242, "/") is None
    assert not (cgroupfs / "oomguard-run-7").exists()


def test_only_a_cgroup_made_for_the_run_is_its_own():
    mk = lambda cg: Run(7, UID, "u", 1, 1, 0.0, "x", cg)  # noqa: E731
    assert lifecycle.owns_cgroup(mk("/user.slice/oomguard-run-7"))
    assert lifecycle.owns_cgroup(mk("/user.slice/oomguard-run-7.scope"))
    assert not lifecycle.owns_cgroup(mk("/user.slice/oomguard-run-70"))
    assert not lifecycle.owns_cgroup(mk("/oomguard.app"))
    assert not lifecycle.owns_cgroup(mk(None))


# ---------------------------------------------------------------- admission


def test_asking_twice_gets_the_same_run(reg):
    r = run(reg, cgroup="/oomguard-run-1")
    assert RunLifecycle(reg).admit(UID, r.pid, r.starttime, "/oomguard-run-1", 64) == r


def test_a_process_inside_a_run_gets_that_run_not_a_nested_one(reg):
    r = run(reg, cgroup="/user.slice/oomguard-run-1")
    got = RunLifecycle(reg).admit(UID, 4001, 41, "/user.slice/oomguard-run-1/sub", 64)
    assert got == r
    # a cgroup-less run's followed child likewise
    bare = run(reg, pid=5000, start=50)
    reg.on_fork(5000, 50, 5001, 51)
    assert RunLifecycle(reg).admit(UID, 5001, 51, "/elsewhere", 64) == bare


def test_a_process_inside_another_users_run_is_refused(reg):
    run(reg, cgroup="/oomguard-run-1")
    with pytest.raises(RunRefused) as e:
        RunLifecycle(reg).admit(UID + 1, 4001, 41, "/oomguard-run-1", 64)
    assert e.value.reason == RefusalReason.NESTED


def test_active_runs_per_uid_are_capped_and_freed_when_one_ends(reg):
    runs = [run(reg, pid=4000 + i, start=i) for i in range(3)]
    life = RunLifecycle(reg)
    with pytest.raises(RunRefused) as e:
        life.admit(UID, 4999, 99, None, 3)
    assert e.value.reason == RefusalReason.LIMIT
    assert life.admit(UID + 1, 4999, 99, None, 3) is None  # another user is not counted
    life.end(runs[0].id)
    assert life.admit(UID, 4999, 99, None, 3) is None


# ---------------------------------------------------------------- the end, once


def test_the_end_is_set_once(reg):
    life = RunLifecycle(reg)
    r = run(reg)
    first = life.end(r.id, "killed by healer")
    assert first is not None and not first.active and first.end_reason == "killed by healer"
    assert life.end(r.id, "exited") is None
    assert reg.get(r.id) == first


def test_a_claimed_end_keeps_its_reason_whoever_ends_the_run(reg):
    life = RunLifecycle(reg)
    r = run(reg)
    assert life.claim_end(r.id, "killed by healer")
    assert not life.claim_end(r.id, "stopped by an administrator")  # the first claim stands
    assert reg.get(r.id).active and reg.get(r.id).end_reason == "killed by healer"
    (ended,) = life.reap()  # pid 4000 with start time 40 is not running
    assert ended.end_reason == "killed by healer"


def test_a_withdrawn_claim_leaves_the_run_going_unclaimed(reg):
    life = RunLifecycle(reg)
    r = run(reg)
    life.claim_end(r.id, "killed by healer")
    life.withdraw_claim(r.id, "stopped by an administrator")  # not its claim: kept
    assert reg.get(r.id).end_reason == "killed by healer"
    life.withdraw_claim(r.id, "killed by healer")
    assert reg.get(r.id).active and reg.get(r.id).end_reason is None


def test_the_first_processes_exit_status_is_recorded_once(reg):
    life = RunLifecycle(reg)
    r = run(reg)
    assert life.exited(r.pid, 3 << 8).exit_status == 3
    assert life.exited(r.pid, 9) is None  # a later exit of a reused pid changes nothing
    assert reg.get(r.id).exit_status == 3
    (ended,) = life.reap()
    assert (ended.exit_status, ended.end_reason) == (3, EXITED)


def test_reap_removes_the_runs_own_cgroup_and_reads_its_peak(reg, cgroupfs):
    own = cgroupfs / "oomguard-run-1"
    own.mkdir()
    (own / "memory.peak").write_text("123456\n")
    r = run(reg, cgroup="/oomguard-run-1")
    live = subprocess.Popen(["sleep", "60"])
    try:
        (own / "cgroup.procs").write_text(f"{live.pid}\n")
        assert RunLifecycle(reg).reap() == []  # populated: still running
        (own / "cgroup.procs").write_text("")
        (ended,) = RunLifecycle(reg).reap()
    finally:
        live.kill()
        live.wait()
    assert ended.id == r.id and ended.peak_memory == 123456
    assert not own.exists()


def test_reap_never_removes_a_cgroup_the_run_only_sat_in(reg, cgroupfs):
    (cgroupfs / "oomguard.app").mkdir()
    run(reg, cgroup="/oomguard.app")
    (ended,) = RunLifecycle(reg).reap()
    assert not ended.active
    assert (cgroupfs / "oomguard.app").is_dir()


def test_reap_hands_on_each_ended_run_once_including_those_ended_by_a_killer(reg):
    life = RunLifecycle(reg)
    me = procfs.snapshot(os.getpid())
    alive = run(reg, pid=me.pid, start=me.starttime)
    killed = run(reg, pid=4100, start=41)
    life.end(killed.id, "killed by healer")
    assert [r.id for r in life.reap()] == [killed.id]
    assert life.reap() == []
    assert reg.get(alive.id).active


def test_abandon_forgets_the_run_and_removes_its_cgroup(reg, cgroupfs):
    (cgroupfs / "oomguard-run-1").mkdir()
    r = run(reg, cgroup="/oomguard-run-1")
    RunLifecycle(reg).abandon(r)
    assert reg.get(r.id) is None and not (cgroupfs / "oomguard-run-1").exists()


# ---------------------------------------------------------------- the grant goes through it


@pytest.fixture
def granting(tmp_path, cgroupfs, monkeypatch):
    """A Granter for root's own processes; the -1000 writes are recorded."""
    writes = []
    monkeypatch.setattr(procfs, "write_oom_score_adj",
                        lambda value, pid="self", dir_fd=None: writes.append(value))
    children = []

    def make(**protect):
        cfg = config.ProtectConfig(allow_uids=frozenset({os.getuid()}), **protect)
        reg = RunRegistry(tmp_path / "runs.json", "boot")
        return Granter(cfg, reg), reg

    def peer_of(child: subprocess.Popen) -> Peer:
        p = Peer(pid=child.pid, uid=os.getuid(), gid=os.getgid(), groups=(), accepted=procfs.since_boot())
        broker.pin(p)
        return p

    def spawn() -> subprocess.Popen:
        children.append(subprocess.Popen(["sleep", "60"]))
        return children[-1]

    yield make, peer_of, spawn, writes
    for c in children:
        c.kill()
        c.wait()


def test_a_second_request_from_a_protected_process_gets_its_run_back(granting, cgroupfs):
    make, peer_of, spawn, writes = granting
    g, reg = make()
    child = spawn()
    first = g.grant(peer_of(child))
    assert first.cgroup == f"/oomguard-run-{first.id}"
    # the kernel would now show it inside its run's cgroup
    again = g.grant(peer_of(child))
    assert again == first
    assert [r.id for r in reg.all()] == [first.id]
    assert [p.name for p in cgroupfs.iterdir() if p.is_dir()] == [f"oomguard-run-{first.id}"]  # nothing nested
    assert writes == [-1000, -1000]


def test_a_planted_cgroup_refuses_the_grant_and_records_no_run(granting, cgroupfs):
    make, peer_of, spawn, writes = granting
    g, reg = make()
    planted = cgroupfs / f"oomguard-run-{reg._next_id}"
    planted.mkdir()
    os.chown(planted, 65534, 65534)  # a user made it (in a cgroup delegated to them)
    with pytest.raises(Refusal) as e:
        g.grant(peer_of(spawn()))
    assert e.value.reason == RefusalReason.ERROR
    assert reg.all() == [] and writes == []


def test_the_grant_refuses_past_the_per_uid_cap(granting):
    make, peer_of, spawn, writes = granting
    g, reg = make(max_runs_per_uid=2, run_cgroups=False)
    for _ in range(2):
        g.grant(peer_of(spawn()))
    with pytest.raises(Refusal) as e:
        g.grant(peer_of(spawn()))
    assert e.value.reason == RefusalReason.LIMIT == "limit"
    assert len(reg.active()) == 2 and writes == [-1000, -1000]


def test_a_grant_is_on_disk_before_the_reply_even_when_deferred(granting, tmp_path):
    make, peer_of, spawn, writes = granting
    g, _ = make(run_cgroups=False)
    g.registry.deferred = True
    run_ = g.grant(peer_of(spawn()))
    assert [r.id for r in RunRegistry(tmp_path / "runs.json", "boot").all()] == [run_.id]


def test_the_max_runs_per_uid_setting_is_read_and_bounded(tmp_path):
    path = tmp_path / "oomguard.toml"
    path.write_text("[protect]\nmax_runs_per_uid = 5\n")
    assert config.load(str(path)).protect.max_runs_per_uid == 5
    assert config.ProtectConfig().max_runs_per_uid == 64
    path.write_text("[protect]\nmax_runs_per_uid = 0\n")
    with pytest.raises(config.ConfigError, match="max_runs_per_uid"):
        config.load(str(path))
