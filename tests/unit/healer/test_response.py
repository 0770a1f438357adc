"""The response once the grace is over: restarts with back-off until the checks pass or the tries run out, and dry run."""

from __future__ import annotations

import logging

from healer_rig import Rig, add_run, alive, down_at


def test_restart_even_without_protected_processes(rig):
    rig.on_restart = lambda: setattr(rig.probe, "up", True)
    h = rig.healer()
    down_at(rig, h)
    rig.step(h, 180)
    assert [r[1] for r in rig.restarts] == [["restart-php"], ["restart-nginx"]]
    for _, _, kw in rig.restarts:
        assert kw["oom_score_adj"] == 0  # never the daemon's -1000
        assert kw["kill_group"] is False
    rig.step(h, 1)
    assert h.incident is None
    actions = [a["action"] for a in rig.actions()]
    assert actions == ["down", "restart", "recovered"]
    assert rig.actions("recovered")[0]["restart_tries"] == 1


def test_restart_backs_off_and_gives_up(tmp_path):
    rig = Rig(tmp_path, restart_tries=4, restart_backoff=5.0, restart_backoff_max=12.0)
    h = rig.healer()
    down_at(rig, h)
    rig.step(h, 180)
    rig.step(h, 60)
    tries = [r[0] for r in rig.restarts if r[1] == ["restart-php"]]
    assert len(tries) == 4
    assert [b - a for a, b in zip(tries, tries[1:], strict=False)] == [5.0, 10.0, 12.0]
    restarts = rig.actions("restart")
    assert [r["try"] for r in restarts] == [1, 2, 3, 4]
    assert [r["verify_for"] for r in restarts] == [5.0, 10.0, 12.0, 12.0]
    gave_up = rig.actions("gave_up")
    assert len(gave_up) == 1 and gave_up[0]["tries"] == 4
    assert h.status()["phase"] == "gave_up"
    rig.step(h, 120)
    assert len(rig.restarts) == 8  # no fifth try


def test_dry_run_decides_but_acts_on_nothing(tmp_path, procs, caplog):
    rig = Rig(tmp_path, dry_run=True)
    p, _ = procs.start("exec sleep 1000")
    run = add_run(rig.registry, p.pid)
    h = rig.healer()
    caplog.set_level(logging.WARNING, logger="oomguard.healer")
    down_at(rig, h)
    rig.step(h, 300)
    assert alive(p.pid)
    assert rig.restarts == []
    assert rig.registry.get(run.id).end_reason is None and rig.registry.get(run.id).active
    would = rig.actions("would_kill")
    assert len(would) == 1 and would[0]["run"] == run.id and would[0]["dry_run"] is True
    assert "longer than the 3m00s grace" in would[0]["reason"]
    assert rig.actions("would_restart")[0]["services"] == ["php-fpm", "nginx"]
    assert h.status()["phase"] == "dry_run"
    text = caplog.text
    assert (
        "dry-run: would kill run" in text
        and "dry-run: would restart services php-fpm,nginx" in text
    )
    assert "dry-run: shop down" in text
