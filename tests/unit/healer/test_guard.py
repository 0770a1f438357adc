"""The never-kill rules: root, oomguard itself, the database, policy exemptions, re-checked right before the signal."""

from __future__ import annotations

import os
import time

from healer_rig import NOBODY, Rig, add_run, alive, down_at, fake_proc

from oomguard.healer import guard


def test_never_kills_root(rig, procs):
    p, _ = procs.start("exec sleep 1000", uid=0)
    run = add_run(
        rig.registry, p.pid, uid=NOBODY
    )  # the registry may be wrong; the uid check is not
    rec = rig.healer().kill_run(run)
    assert alive(p.pid)
    assert rec["skipped"] == {str(p.pid): "root's process"}


def test_never_kills_oomguard_itself(rig):
    run = add_run(rig.registry, os.getpid())
    rec = rig.healer().kill_run(run)
    assert rec["skipped"] == {str(os.getpid()): "oomguard itself"}


def test_never_kills_what_the_policy_exempts(rig, procs):
    p, _ = procs.start("exec sleep 1000")
    run = add_run(rig.registry, p.pid)
    rec = rig.healer(is_exempt=lambda proc: proc.pid == p.pid).kill_run(run)
    assert alive(p.pid)
    assert rec["skipped"] == {str(p.pid): "exempt by policy"}


def test_a_failing_exemption_check_means_exempt(rig, procs):
    p, _ = procs.start("exec sleep 1000")
    run = add_run(rig.registry, p.pid)

    def broken(proc):
        raise RuntimeError("policy not loaded")

    rec = rig.healer(is_exempt=broken).kill_run(run)
    assert alive(p.pid)
    assert rec["skipped"] == {str(p.pid): "exemption check failed"}


def test_exemption_is_rechecked_right_before_sigkill(tmp_path, procs):
    """A process exempt by the time SIGKILL is due is spared, although it was
    fair game at SIGTERM time."""
    rig = Rig(tmp_path, term_timeout=10.0)
    p, _ = procs.start("trap '' TERM; while :; do sleep 1; done")
    run = add_run(rig.registry, p.pid)
    exempt = set()
    h = rig.healer(is_exempt=lambda proc: proc.pid in exempt)
    down_at(rig, h)
    rig.step(h, 180)
    assert rig.actions("term")
    exempt.add(p.pid)
    rig.step(h, 10)  # SIGKILL is due now
    rig.step(h, 1)
    time.sleep(0.2)
    assert alive(p.pid)
    spared = rig.actions("spared_some")
    assert len(spared) == 1 and spared[0]["skipped"] == {str(p.pid): "exempt by policy"}
    assert rig.registry.get(run.id).active and rig.registry.get(run.id).end_reason is None


def test_database_is_recognised_by_its_system_executable():
    assert guard.is_database(fake_proc(1, 105, exe="/usr/sbin/mariadbd"))
    assert guard.is_database(fake_proc(1, 105, exe="/usr/sbin/mysqld (deleted)"))
    assert not guard.is_database(fake_proc(1, 1000, exe="/home/app/mariadbd"))  # a user's copy
    assert not guard.is_database(fake_proc(1, 1000, exe="/usr/bin/php8.2", comm="mariadbd"))
    # the system's binary, but not the system's database: a login user's, or inside a run
    assert not guard.is_database(fake_proc(1, 1000, exe="/usr/sbin/mariadbd"))
    assert not guard.is_database(fake_proc(1, 105, exe="/usr/sbin/mariadbd"), in_run=True)
