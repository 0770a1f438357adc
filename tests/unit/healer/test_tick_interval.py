"""How long the healer waits between ticks (Healer.next_tick, pure, on the
fake clock): the fast cadence only while something is happening, otherwise
until the next probe is due, at most calm_interval; and the loop collects a
finished probe at once instead of waiting out its calm wait."""

from __future__ import annotations

import threading
import time

from healer_rig import Rig, down_at

from oomguard.config import Check
from oomguard.healer import health, probe_base


def test_calm_waits_until_the_next_probe_is_due(rig):
    h = rig.healer()
    h.tick()  # the first probe, healthy; the next is due 5 s later
    now = rig.clock.boot
    assert h.next_tick(now) == 5.0
    assert h.next_tick(now + 2) == 3.0
    assert h.next_tick(now + 5) == h.tick_interval / 10  # overdue: soon, never a busy loop


def test_calm_never_waits_longer_than_calm_interval(tmp_path):
    rig = Rig(tmp_path, checks=(Check("shop", "command", "probe", interval=600.0, timeout=1.0),))
    h = rig.healer(calm_interval=7.0)
    h.tick()
    assert h.next_tick(rig.clock.boot) == 7.0


def test_without_checks_it_ticks_at_the_calm_interval(tmp_path):
    h = Rig(tmp_path, checks=()).healer()
    h.tick()
    assert h.next_tick(0.0) == h.calm_interval == 5.0


def test_a_failing_check_and_an_incident_tick_fast(rig):
    h = rig.healer()
    h.tick()
    rig.probe.up = False
    rig.step(h, 5)  # one failure, below the threshold: no incident yet
    assert h.incident is None
    assert h.next_tick(rig.clock.boot) == 0.5
    rig.step(h, 5)
    assert h.incident is not None
    assert h.next_tick(rig.clock.boot) == 0.5


def test_calm_again_once_recovered(rig):
    h = rig.healer()
    down_at(rig, h)
    rig.step(h, 10)
    assert h.incident is not None
    rig.probe.up = True
    rig.step(h, 5)
    assert h.incident is None
    assert h.next_tick(rig.clock.boot) > 1.0


def test_oom_activity_in_the_app_cgroup_ticks_fast(rig):
    h = rig.healer()
    h.tick()
    calm = h.next_tick(rig.clock.boot)
    assert calm > 1.0
    for attr, value in (("kill_rate", 0.5), ("oom_rate", 2.0), ("storm_active", True)):
        setattr(h.storm, attr, value)
        assert h.next_tick(rig.clock.boot) == 0.5, attr
        setattr(h.storm, attr, type(value)(0))
    h.storm.livelock_since = rig.clock.boot
    assert h.next_tick(rig.clock.boot) == 0.5
    h.storm.livelock_since = None
    assert h.next_tick(rig.clock.boot) == calm


class Blind:
    """A scripted monitor that cannot say when it is calm."""

    def poll(self, now):
        return []

    def probe_soon(self):
        pass

    def close(self):
        pass

    def down(self):
        return False

    def down_checks(self):
        return []

    def down_since(self):
        return None

    def healthy(self):
        return True

    def status(self):
        return {}


def test_a_monitor_that_cannot_tell_keeps_the_fast_cadence(rig):
    h = rig.healer(monitor=Blind())
    h.tick()
    assert h.next_tick(rig.clock.boot) == h.tick_interval


def test_the_loop_collects_a_finished_probe_at_once_and_stops_at_once(tmp_path):
    """A calm wait of 30 s, a probe that answers after 0.2 s with a 20 s
    time-out: the result is in within a second, because the probe's thread
    wakes the loop; and stop_waiting ends the calm wait."""
    rig = Rig(tmp_path, checks=(Check("shop", "command", "probe", interval=60.0, timeout=20.0),))

    def slow_probe(check, cancel):
        time.sleep(0.2)
        return probe_base.ProbeResult(True, "fine")

    monitor = health.HealthMonitor(rig.config.healer.checks, slow_probe)
    h = rig.healer(monitor=monitor, calm_interval=30.0, clock=None)
    stop = threading.Event()
    t = threading.Thread(target=h.run, args=(stop,), daemon=True)
    t0 = time.monotonic()
    t.start()
    while h.status()["checks"]["shop"]["healthy"] is not True:
        assert time.monotonic() - t0 < 3.0, "the finished probe waited for the next tick"
        time.sleep(0.02)
    ticks = h.ticks
    time.sleep(0.6)
    assert h.ticks == ticks  # calm: no tick every 0.5 s
    stop.set()
    h.stop_waiting()
    t.join(2)
    assert not t.is_alive()


def test_an_app_cgroup_to_watch_is_sampled_about_once_a_second(rig, fake_cgroupfs):
    h = rig.healer()
    h.tick()
    assert not h.storm.watching and h.next_tick(rig.clock.boot) == 5.0  # no memory.events: nothing to sample
    (fake_cgroupfs / "app" / "memory.events").write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n")
    rig.clock.advance(1.0)
    h.tick()
    assert h.storm.watching
    assert h.next_tick(rig.clock.boot) == 1.0  # calm, yet a storm is seen within a second
