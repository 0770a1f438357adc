"""The storm guard and the livelock watch, on a fake cgroup tree's memory.events."""

from __future__ import annotations

import signal

import pytest
from healer_rig import NOBODY, Rig, add_run, alive, down_at, storm, write_events


def test_storm_kills_the_nonessential_processes(rig, fake_cgroupfs, procs):
    victim, _ = procs.start("exec sleep 1000")
    h = rig.healer(nonessential_pids=lambda: [victim.pid])
    storm(rig, h, fake_cgroupfs, [0, 2, 6])  # 6 kills in a second >= 5
    assert victim.wait(5) == -signal.SIGKILL
    ev = [(d, uids) for k, d, uids in rig.events if k == "storm"]
    assert len(ev) == 1
    assert ev[0][0]["killed"] == [{"pid": victim.pid, "comm": "sleep", "uid": NOBODY}]
    assert ev[0][1] == [NOBODY]
    assert h.status()["storm"]["active"] is True


def test_no_storm_below_the_rate(rig, fake_cgroupfs, procs):
    victim, _ = procs.start("exec sleep 1000")
    h = rig.healer(nonessential_pids=lambda: [victim.pid])
    storm(rig, h, fake_cgroupfs, [0, 1, 2, 3, 4, 5, 6, 7, 8], dt=0.5)  # 2 kills/s
    assert alive(victim.pid)
    assert not [e for e in rig.events if e[0] == "storm"]


def test_permissive_turns_the_storm_guard_off(tmp_path, fake_cgroupfs, procs):
    rig = Rig(tmp_path, permissive=True)
    victim, _ = procs.start("exec sleep 1000")
    h = rig.healer(nonessential_pids=lambda: [victim.pid])
    storm(rig, h, fake_cgroupfs, [0, 10, 20, 30])
    assert alive(victim.pid)
    ev = [d for k, d, _ in rig.events if k == "storm"]
    assert len(ev) == 1 and ev[0]["action"] == "none" and ev[0]["reason"] == "permissive"


def test_a_user_who_chose_permissive_keeps_their_processes_through_a_storm(rig, fake_cgroupfs, procs):
    victim, _ = procs.start("exec sleep 1000")  # nobody's, and nobody chose permissive
    h = rig.healer(nonessential_pids=lambda: [victim.pid], permissive_for=lambda uid: uid == NOBODY)
    storm(rig, h, fake_cgroupfs, [0, 2, 6])
    assert alive(victim.pid)
    (ev,) = [d for k, d, _ in rig.events if k == "storm"]
    assert ev["killed"] == [] and "permissive" in ev["skipped"][str(victim.pid)]


def test_storm_guard_in_dry_run_kills_nothing(tmp_path, fake_cgroupfs, procs):
    rig = Rig(tmp_path, dry_run=True)
    victim, _ = procs.start("exec sleep 1000")
    h = rig.healer(nonessential_pids=lambda: [victim.pid])
    storm(rig, h, fake_cgroupfs, [0, 10])
    assert alive(victim.pid)
    ev = [d for k, d, _ in rig.events if k == "storm"]
    assert ev and ev[0]["dry_run"] is True and ev[0]["killed"][0]["pid"] == victim.pid


def test_storm_guard_spares_protected_runs_and_root(rig, fake_cgroupfs, procs):
    run_proc, _ = procs.start("exec sleep 1000")
    root_proc, _ = procs.start("exec sleep 1000", uid=0)
    add_run(rig.registry, run_proc.pid)
    h = rig.healer(nonessential_pids=lambda: [run_proc.pid, root_proc.pid])
    storm(rig, h, fake_cgroupfs, [0, 10])
    assert alive(run_proc.pid) and alive(root_proc.pid)
    ev = [d for k, d, _ in rig.events if k == "storm"][0]
    assert ev["killed"] == []
    assert ev["skipped"] == {
        str(run_proc.pid): "protected: the grace decides",
        str(root_proc.pid): "root's process",
    }


def test_livelock_is_reported_at_once(rig, fake_cgroupfs):
    h = rig.healer()
    for oom in (100, 400, 700):
        write_events(fake_cgroupfs, oom=oom, oom_kill=7)
        rig.clock.advance(0.5)
        h.tick()
    st = h.status()["livelock"]
    assert st["active"] is True and st["since"] == pytest.approx(rig.clock.wall_now)
    ev = [(d, u) for k, d, u in rig.events if k == "oom_livelock"]
    assert len(ev) == 1 and ev[0][0]["state"] == "started" and ev[0][0]["oom_kill"] == 7
    assert rig.gauge("oomguard_healer_livelock", cgroup="/app") == 1.0
    for oom in (1000, 1300):  # still stuck: no second event
        write_events(fake_cgroupfs, oom=oom, oom_kill=7)
        rig.clock.advance(0.5)
        h.tick()
    assert len([e for e in rig.events if e[0] == "oom_livelock"]) == 1
    write_events(fake_cgroupfs, oom=1300, oom_kill=7)  # oom stops climbing
    rig.clock.advance(0.5)
    h.tick()
    ev = [d for k, d, _ in rig.events if k == "oom_livelock"]
    assert [d["state"] for d in ev] == ["started", "ended"]
    assert h.status()["livelock"]["active"] is False
    assert rig.gauge("oomguard_healer_livelock", cgroup="/app") == 0.0


def test_ooms_with_kills_are_not_a_livelock(rig, fake_cgroupfs):
    h = rig.healer()
    for n in (1, 2, 3, 4):
        write_events(fake_cgroupfs, oom=n, oom_kill=n)
        rig.clock.advance(1.0)
        h.tick()
    assert not [e for e in rig.events if e[0] == "oom_livelock"]
    assert h.status()["livelock"]["active"] is False


def test_livelock_tells_the_run_owners(rig, fake_cgroupfs, procs):
    p, _ = procs.start("exec sleep 1000")
    add_run(rig.registry, p.pid)
    h = rig.healer()
    for oom in (1, 5, 9):
        write_events(fake_cgroupfs, oom=oom, oom_kill=0)
        rig.clock.advance(0.5)
        h.tick()
    (data, uids) = [(d, u) for k, d, u in rig.events if k == "oom_livelock"][0]
    assert uids == [NOBODY] and len(data["runs"]) == 1


def test_livelock_does_not_shorten_the_grace(rig, fake_cgroupfs, procs):
    p, _ = procs.start("exec sleep 1000")
    add_run(rig.registry, p.pid)
    h = rig.healer()
    first_fail = down_at(rig, h)
    oom = 0
    for _ in range(170):
        oom += 600
        write_events(fake_cgroupfs, oom=oom, oom_kill=3)
        rig.clock.advance(1.0)
        h.tick()
    assert h.status()["livelock"]["active"] is True
    assert rig.actions("term") == [] and alive(p.pid)
    while rig.clock.boot < first_fail + 180:
        rig.clock.advance(1.0)
        h.tick()
    assert rig.actions("term")
