"""Ending runs on real processes: SIGTERM, SIGKILL, cgroup.kill of a run's own cgroup only, and whom the healer targets."""

from __future__ import annotations

import os
import signal

import pytest
from healer_rig import IGNORES_TERM, NOBODY, Rig, add_run, alive, fake_proc, wait_dead

from oomguard.config import (
    login_uid_range,
)
from oomguard.healer import killer
from oomguard.host import cgroups, procfs


def test_kill_run_sigterm_is_enough_for_a_polite_run(rig, procs):
    p, _ = procs.start("exec sleep 1000")
    run = add_run(rig.registry, p.pid)
    h = rig.healer()
    rec = h.kill_run(run.id)
    assert rec["action"] == "killed"
    assert p.wait(5) == -signal.SIGTERM
    assert rig.registry.get(run.id).end_reason == killer.KILLED_BY_HEALER


def test_kill_run_escalates_to_sigkill(tmp_path, procs):
    rig = Rig(tmp_path, term_timeout=0.3)
    p, (child,) = procs.start(IGNORES_TERM)
    run = add_run(rig.registry, p.pid)
    rig.registry.add_member((child, procfs.starttime_of(child)), run.id)
    rec = rig.healer().kill_run(run)
    assert rec["action"] == "killed", rec
    assert p.wait(5) == -signal.SIGKILL
    assert wait_dead(child)
    assert [r.end_reason for r in rig.registry.reap()] == [killer.KILLED_BY_HEALER]
    assert rig.events[-1][2] == [NOBODY]


def test_kill_run_does_not_signal_a_reused_pid(rig, procs):
    p, _ = procs.start("exec sleep 1000")
    run = add_run(rig.registry, p.pid, starttime=procfs.starttime_of(p.pid) - 1)
    rec = rig.healer().kill_run(run)
    assert rec["action"] == "already_gone"
    assert alive(p.pid)
    assert rig.registry.get(run.id).end_reason is None


def test_kill_run_in_its_own_cgroup_uses_cgroup_kill(tmp_path, fake_cgroupfs, procs, monkeypatch):
    rig = Rig(tmp_path, term_timeout=0.2)
    p, _ = procs.start("trap '' TERM; while :; do sleep 1; done")
    (fake_cgroupfs / "app" / "run-1").mkdir()
    (fake_cgroupfs / "app" / "run-1" / "cgroup.procs").write_text(f"{p.pid}\n")
    killed_cgroups = []

    def fake_kill(cg):
        killed_cgroups.append(cg)
        for pid in cgroups.procs(cg):
            os.kill(pid, signal.SIGKILL)

    monkeypatch.setattr(cgroups, "kill", fake_kill)
    run = add_run(rig.registry, p.pid, cgroup="/app/run-1")
    rec = rig.healer().kill_run(run)
    assert killed_cgroups == ["/app/run-1"]  # the run's own, never /app
    assert rec["method"] == "cgroup.kill" and rec["action"] == "killed"
    assert p.wait(5) == -signal.SIGKILL


def test_kill_run_never_uses_cgroup_kill_on_the_shared_app_cgroup(
    tmp_path, fake_cgroupfs, procs, monkeypatch
):
    rig = Rig(tmp_path, term_timeout=0.2)
    p, _ = procs.start("trap '' TERM; while :; do sleep 1; done")
    (fake_cgroupfs / "app" / "cgroup.procs").write_text(f"{p.pid}\n")
    monkeypatch.setattr(cgroups, "kill", lambda cg: pytest.fail(f"cgroup.kill on {cg}"))
    run = add_run(rig.registry, p.pid, cgroup="/app")
    rec = rig.healer().kill_run(run)
    assert rec["method"] == "pidfd" and rec["action"] == "killed"
    assert p.wait(5) == -signal.SIGKILL


def test_cgroup_holding_a_root_process_is_killed_one_by_one(
    tmp_path, fake_cgroupfs, procs, monkeypatch
):
    rig = Rig(tmp_path, term_timeout=0.2)
    user, _ = procs.start("trap '' TERM; while :; do sleep 1; done")
    root, _ = procs.start("exec sleep 1000", uid=0)
    (fake_cgroupfs / "app" / "run-1").mkdir()
    (fake_cgroupfs / "app" / "run-1" / "cgroup.procs").write_text(f"{user.pid}\n{root.pid}\n")
    monkeypatch.setattr(cgroups, "kill", lambda cg: pytest.fail(f"cgroup.kill on {cg}"))
    run = add_run(rig.registry, user.pid, cgroup="/app/run-1")
    rec = rig.healer().kill_run(run)
    assert user.wait(5) == -signal.SIGKILL
    assert alive(root.pid)
    assert rec["action"] == "spared_some"
    assert rec["skipped"] == {str(root.pid): "root's process"}
    assert rig.registry.get(run.id).active  # something of it still runs


def test_selection_of_protected_processes_outside_runs(rig):
    lo, _ = login_uid_range()
    fakes = [
        fake_proc(101, 0),  # root
        fake_proc(102, 105, exe="/usr/sbin/mariadbd"),  # the database
        fake_proc(103, lo, exe="/usr/sbin/mariadbd"),  # a login user's own copy: theirs, not the database
        fake_proc(104, lo),  # exempt by policy
        fake_proc(os.getpid(), lo),  # oomguard itself
        fake_proc(106, 33),  # a system account (www-data)
        fake_proc(107, lo, adj=0),  # not protected
        fake_proc(108, lo),  # the one to kill
        fake_proc(109, lo + 1),  # another owner
    ]
    h = rig.healer(processes=lambda: fakes, is_exempt=lambda proc: proc.pid == 104)
    targets = h.select_targets()
    assert [(t.uid, [p.pid for p in t.orphans]) for t in targets] == [(lo, [103, 108]), (lo + 1, [109])]
    assert all(t.run is None for t in targets)


def test_an_allowed_system_account_is_swept_too(rig):
    """allow_users = ["www-data"]: its loose -1000 processes are the healer's
    to end, as a login user's are; another system account's stay alone."""
    import dataclasses

    lo, _ = login_uid_range()
    rig.config = dataclasses.replace(rig.config, protect=dataclasses.replace(
        rig.config.protect, allow_uids=frozenset({33, lo})))  # fmt: skip
    fakes = [fake_proc(106, 33), fake_proc(110, 34), fake_proc(108, lo)]
    h = rig.healer(processes=lambda: fakes)
    assert [(t.uid, [p.pid for p in t.orphans]) for t in h.select_targets()] == [(33, [106]), (lo, [108])]
    assert h.may_end(fakes[0]) and not h.may_end(fakes[1])


def test_a_fork_chain_that_renews_its_pid_while_listed_is_not_gone(tmp_path, fake_cgroupfs, procs, monkeypatch):
    """Each process a listing names has forked and exited by the time it is
    checked (a chain under load): one listing never shows the live one, so
    gone() lists again until a listing shows nobody new."""
    rig = Rig(tmp_path)
    chain = [procs.start("exec sleep 1000")[0] for _ in range(3)]
    listed = fake_cgroupfs / "app" / "run-1" / "cgroup.procs"
    listed.parent.mkdir()
    listed.write_text(f"{chain[0].pid}\n")
    run = add_run(rig.registry, chain[0].pid, cgroup="/app/run-1")
    real = procfs.snapshot

    def chain_moves_on(pid):
        for old, new in zip(chain, chain[1:], strict=False):
            if pid == old.pid:
                listed.write_text(f"{new.pid}\n")  # it forked the next one and exited
                return None
        return real(pid)

    monkeypatch.setattr(procfs, "snapshot", chain_moves_on)
    kill = killer.Kill(rig.healer().killer, run, NOBODY, "nobody")
    assert kill.gone() is False  # the third one lives, listed only by the third listing
    listed.write_text("")
    assert kill.gone() is True
