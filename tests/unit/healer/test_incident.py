"""The incident on disk: written atomically, resumed after a daemon restart, void after a reboot."""

from __future__ import annotations

import pytest
from healer_rig import BOOT, at, down_at

from oomguard.host import statefile as state


def test_clock_survives_a_daemon_restart(rig):
    h = rig.healer()
    first_fail = down_at(rig, h)
    rig.step(h, 60)
    assert h.incident is not None
    del h  # the daemon dies mid-incident
    rig.clock.advance(30)  # and is back 30 s later
    h2 = rig.healer()
    assert h2.incident is not None and h2.incident.start == first_fail
    st = h2.status()
    assert st["down_since"] == pytest.approx(at(12, 0, 5))
    assert st["time_left"] == pytest.approx(180 - 90)
    # The fresh monitor has seen nothing yet: the clock goes on, it does not restart.
    rig.step(h2, 89)
    assert rig.restarts == []
    rig.step(h2, 1)
    assert rig.restarts and rig.restarts[0][0] == first_fail + 180


def test_restart_with_a_healthy_shop_ends_the_incident(rig):
    h = rig.healer()
    down_at(rig, h)
    rig.step(h, 20)
    rig.probe.up = True
    h2 = rig.healer()
    rig.step(h2, 1)
    assert h2.incident is None
    assert rig.actions("recovered")[0]["downtime"] == pytest.approx(21.0)


def test_incident_of_an_earlier_boot_is_void(rig):
    h = rig.healer()
    down_at(rig, h)
    rig.step(h, 60)
    h2 = rig.healer(boot_id="boot-B")
    assert h2.incident is None
    assert h2.status()["time_left"] is None
    assert state.read_json(rig.tmp / "healer.json")["incident"] is None


def test_restart_tries_survive_a_daemon_restart(rig):
    h = rig.healer()
    down_at(rig, h)
    rig.step(h, 180)
    assert len(rig.actions("restart")) == 1
    h2 = rig.healer()
    assert h2.incident.tries == 1 and h2.incident.phase == "verifying"
    rig.step(h2, 5)
    assert [r["try"] for r in rig.actions("restart")] == [1, 2]


def test_state_file_is_written_atomically_and_read_back(rig):
    h = rig.healer()
    down_at(rig, h)
    rig.step(h, 5)
    data = state.read_json(rig.tmp / "healer.json")
    assert data["incident"]["boot_id"] == BOOT
    assert data["incident"]["start"] == h.incident.start
    assert not [p for p in rig.tmp.iterdir() if p.name.endswith(".tmp")]
