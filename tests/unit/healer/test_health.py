"""The health monitor: consecutive failures, the first failing probe, and a loop that never waits on a hung endpoint."""

from __future__ import annotations

import threading
import time

from probe_servers import alive, check, never_answer, server

from oomguard.healer import health, probe_base, probes


def test_monitor_close_kills_the_commands_of_running_probes(tmp_path):
    pidfile = tmp_path / "check.pid"
    chk = check("command", f"sh -c 'echo $$ > {pidfile}; exec sleep 1000'", interval=1, timeout=60)
    m = health.HealthMonitor([chk])
    m.poll(time.monotonic())
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    pid = int(pidfile.read_text())
    assert alive(pid)
    m.close()
    deadline = time.monotonic() + 10
    while alive(pid):
        assert time.monotonic() < deadline, "a probe's command outlived the monitor"
        time.sleep(0.02)


class Scripted:
    """A probe function whose answer the test sets."""

    def __init__(self):
        self.up = True
        self.calls = 0

    def __call__(self, chk, cancel):
        self.calls += 1
        return probe_base.ProbeResult(self.up, "up" if self.up else "down")


def test_monitor_counts_consecutive_failures_and_remembers_the_first():
    probe = Scripted()
    m = health.HealthMonitor([check("command", "x", interval=5, failures=3)], probe, threaded=False)
    m.poll(0)
    assert m.healthy() and not m.down()
    probe.up = False
    m.poll(5)
    m.poll(7)  # not due: no probe
    m.poll(10)
    assert not m.down() and not m.healthy()
    m.poll(15)
    assert m.down()
    assert m.down_since() == 5  # the first failing probe, not the one at the threshold
    assert probe.calls == 4
    probe.up = True
    m.poll(20)
    assert m.healthy() and not m.down() and m.down_since() is None


def test_monitor_blip_below_threshold_resets():
    probe = Scripted()
    m = health.HealthMonitor([check("command", "x", interval=1, failures=2)], probe, threaded=False)
    probe.up = False
    m.poll(0)
    probe.up = True
    m.poll(1)
    probe.up = False
    m.poll(2)
    assert not m.down()
    m.poll(3)
    assert m.down() and m.down_since() == 2


def test_monitor_probe_soon_makes_checks_due():
    probe = Scripted()
    m = health.HealthMonitor([check("command", "x", interval=60)], probe, threaded=False)
    m.poll(0)
    m.poll(1)
    assert probe.calls == 1
    m.probe_soon()
    m.poll(2)
    assert probe.calls == 2


def test_monitor_keeps_its_cadence_with_hung_endpoints(http_server, tmp_path):
    """A TCP server that accepts and never answers (MySQL check), an HTTP
    server that hangs, a command that sleeps forever, and a probe that
    ignores every time-out: poll() stays quick, failures keep arriving at
    the checks' cadence, hung threads stay capped."""
    release = threading.Event()

    def probe_fn(chk, cancel):
        if chk.name == "stubborn":
            release.wait(60)
            return probe_base.ProbeResult(True, "late")
        return probes.probe(chk, cancel)

    with server(never_answer) as silent:
        checks = [
            check("mysql", silent.address, name="db", interval=0.2, timeout=0.3),
            check("http", http_server + "/hang", name="shop", interval=0.2, timeout=0.3),
            check("command", "sleep 1000", name="cmd", interval=0.2, timeout=0.3),
            check("command", "x", name="stubborn", interval=0.2, timeout=0.2),
        ]
        m = health.HealthMonitor(checks, probe_fn, slack=0.2, max_hung=2)
        start = time.monotonic()
        worst = 0.0
        observations: list[health.Observation] = []
        while time.monotonic() - start < 3.0:
            t0 = time.monotonic()
            observations += m.poll(t0)
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.02)
        release.set()
        m.close()
    assert worst < 0.5, f"poll blocked for {worst:.2f}s"
    for name in ("db", "shop", "cmd", "stubborn"):
        results = [o for o in observations if o.check == name]
        assert len(results) >= 3, (name, results)
        assert not any(o.ok for o in results), name
    assert m.down() and set(m.down_checks()) == {"db", "shop", "cmd", "stubborn"}
    stubborn = [o for o in observations if o.check == "stubborn"]
    assert any(o.abandoned for o in stubborn)
    assert any("still hung" in o.detail for o in stubborn)  # the cap of 2 hung probes held
    assert m.status()["stubborn"]["hung_probes"] <= 2
