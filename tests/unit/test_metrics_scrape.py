"""Every published figure reaches the exporter: scraped over HTTP.

A real daemon's wiring (built in-process, never started), its real
prometheus-client exporter on 127.0.0.1 port 0, and each figure driven
through the code that produces it: refusals through the broker's socket,
kernel OOM reports through the kmsg watcher, the healer's figures through
its tick with a fake clock, the storm guard's through a fake cgroup tree's
memory.events. The scrape must show every metric family with the value
those steps imply; a figure that stops reaching the exporter fails here.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from kmsg_captures import KMSG, load_kmsg
from prometheus_client.parser import text_string_to_metric_families

from oomguard import config
from oomguard.config import Check, Config, HealerConfig, LayoutConfig
from oomguard.daemon import Daemon
from oomguard.healer import health, probe_base
from oomguard.healer.healer import Healer
from oomguard.host import cgroups
from oomguard.runs.run import Run
from oomguard.telemetry.reasons import RefusalReason

# Every family the exporter publishes; a new one must be added here, with
# the step that produces it.
FAMILIES = {
    "oomguard_info",
    "oomguard_oom_kills",
    "oomguard_oom_livelocks",
    "oomguard_oom_livelock",
    "oomguard_protect_grants",
    "oomguard_protect_refusals",
    "oomguard_protected_processes",
    "oomguard_healer_down",
    "oomguard_healer_downtime_seconds",
    "oomguard_healer_tick_seconds",
    "oomguard_healer_oom_kills_per_second",
    "oomguard_healer_livelock",
    "oomguard_healer_actions",
    "oomguard_app_memory_current_bytes",
    "oomguard_app_memory_limit_bytes",
    "oomguard_memory_pressure_some_avg10_ratio",
    "oomguard_memory_pressure_full_avg10_ratio",
    "oomguard_kmsg_lost_records",
}


class FakeClock:
    def __init__(self) -> None:
        self.boot, self.wall_now = 1000.0, 1_717_416_000.0  # 2024-06-03 12:00 UTC

    def boottime(self) -> float:
        return self.boot

    def wall(self) -> float:
        return self.wall_now

    def advance(self, seconds: float) -> None:
        self.boot += seconds
        self.wall_now += seconds


class Scrape:
    """One GET of /metrics, parsed."""

    def __init__(self, port: int):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            self.text = resp.read().decode()
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}

    def value(self, name: str, **labels: str) -> float:
        for fam in self.families.values():
            for s in fam.samples:
                if s.name == name and s.labels == labels:
                    return s.value
        raise AssertionError(f"no sample {name}{labels} in:\n{self.text}")

    def labels(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for f in self.families.values() for s in f.samples if s.name == name}


@pytest.fixture
def daemon(tmp_path):
    cfg_file = tmp_path / "oomguard.toml"
    cfg_file.write_text(
        f"""
[daemon]
state_dir = "{tmp_path / 'state'}"
[protect]
socket = "{tmp_path / 'protect.sock'}"
max_connections_per_uid = 1
request_timeout = "60s"
[events]
db = "{tmp_path / 'events.db'}"
kmsg = "{tmp_path / 'no-kmsg'}"
[metrics]
listen = "127.0.0.1:9464"  # exported (the fixture serves it itself, on a free port)
[policy]
enforce = false
"""
    )
    d = Daemon(config.load(cfg_file), str(cfg_file))
    server = d.metrics.serve("127.0.0.1:0")
    stop = threading.Event()
    d.broker.bind()
    t = threading.Thread(target=d.broker.serve, args=(stop,), daemon=True)
    t.start()
    yield d, server.port
    stop.set()
    t.join(5)
    server.close()
    d.shutdown()


@pytest.fixture
def app_cgroup(tmp_path, monkeypatch):
    root = tmp_path / "cgroupfs"
    (root / "app").mkdir(parents=True)
    monkeypatch.setattr(cgroups, "ROOT", root)
    return root / "app"


def write_events(app: Path, oom: int, oom_kill: int) -> None:
    (app / "memory.events").write_text(f"low 0\nhigh 0\nmax 0\noom {oom}\noom_kill {oom_kill}\n")


def ask(path: str, line: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(path)
        try:
            s.sendall(line)
        except BrokenPipeError:
            pass  # refused (busy) and closed before it read the line: the refusal is waiting
        return json.loads(s.makefile("rb").readline())


def test_every_published_metric_is_scraped_with_its_value(daemon, app_cgroup) -> None:
    d, port = daemon
    assert d.healer.hooks._hooks is d.metrics and d.oomwatch.hooks is d.metrics  # the daemon's wiring

    # ------------------------------------------------ the broker, over its socket
    sock = d.cfg.protect.socket
    assert ask(sock, b'{"op": "protect"}\n')["ok"] is False  # root is no login user: not_allowed
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as held:
        held.connect(sock)  # the one connection root may hold, kept open and silent
        assert ask(sock, b'{"op": "ping"}\n')["ok"] is False  # the second one: busy
        held.sendall(b'{"op": "ping"}\n')  # let the held one finish cleanly
        held.recv(4096)
    d.on_grant(Run(id=1, uid=1000, user="app", pid=4242, starttime=1, started=time.time(),
                   command="php import.php", cgroup=None))  # fmt: skip

    # ------------------------------------------------ the kernel log
    for rec in load_kmsg(KMSG / "linux-6.1-memcg-kill.kmsg", fresh=True):
        d.oomwatch.on_record(rec)
    last = max(r.seq for r in load_kmsg(KMSG / "linux-6.1-memcg-kill.kmsg", fresh=True))
    for rec in load_kmsg(KMSG / "linux-6.1-livelock.kmsg", fresh=True):
        d.oomwatch.on_record(replace(rec, seq=rec.seq + last))  # one ring: it follows the kill
    d.oomwatch.on_idle()
    d.oomwatch.follower._report_lost(3, "ring buffer overrun")
    # the gauges of app memory, pressure and protected processes are read by each scrape itself

    # ------------------------------------------------ the healer and the storm guard
    clock = FakeClock()
    checks = (Check("shop", "command", "probe", interval=1.0, timeout=1.0, failures=1),)
    down = lambda chk, cancel: probe_base.ProbeResult(False, "connection refused")  # noqa: E731
    healer = Healer(
        Config(healer=HealerConfig(checks=checks, grace=3600.0, timezone="UTC"),
               layout=LayoutConfig(app_cgroup="app")),
        d.registry, d.cfg.state_dir + "/scrape-healer.json", d.emit, hooks=d.metrics,
        clock=clock, boot_id="boot", monitor=health.HealthMonitor(checks, down, threaded=False),
        processes=lambda: [], background=False,
    )  # fmt: skip
    for oom, kills in [(0, 0), (8, 8)]:  # 8 OOM kills in a second: a storm
        write_events(app_cgroup, oom, kills)
        healer.tick()
        clock.advance(1.0)
    storm = Scrape(port)
    for oom in (20, 40):  # oom climbs, oom_kill stays at 8: a livelock
        write_events(app_cgroup, oom, 8)
        healer.tick()
        clock.advance(1.0)
    write_events(app_cgroup, 60, 8)
    previous_tick = healer.last_tick_duration
    healer.tick()  # at boot 1004: down since the first probe at 1000
    s = Scrape(port)

    assert set(s.families) == FAMILIES, set(s.families) ^ FAMILIES
    assert s.value("oomguard_info", version=s.labels("oomguard_info", "version").pop()) == 1
    # broker
    assert s.labels("oomguard_protect_refusals_total", "reason") == {r.value for r in RefusalReason}
    for reason in RefusalReason:
        expected = 1 if reason in (RefusalReason.NOT_ALLOWED, RefusalReason.BUSY) else 0
        assert s.value("oomguard_protect_refusals_total", reason=reason.value) == expected, reason
    assert s.value("oomguard_protect_grants_total") == 1
    # kernel log
    assert s.value("oomguard_oom_kills_total", comm="oomguard-hog", cgroup="/oomguard-capture-198") == 1
    assert s.value("oomguard_oom_livelocks_total") == 3  # the capture's three "no killable processes"
    assert s.value("oomguard_oom_livelock") == 1
    assert s.value("oomguard_kmsg_lost_records_total") == 3
    # the daemon's sampler: no run is active here
    assert s.value("oomguard_protected_processes") == 0
    for name in ("oomguard_app_memory_current_bytes", "oomguard_app_memory_limit_bytes"):
        v = s.value(name)
        assert math.isnan(v) or v >= 0, (name, v)
    for name in ("oomguard_memory_pressure_some_avg10_ratio", "oomguard_memory_pressure_full_avg10_ratio"):
        assert 0 <= s.value(name) <= 1, name
    # healer
    assert s.value("oomguard_healer_down") == 1
    assert s.value("oomguard_healer_downtime_seconds") == 4.0
    assert s.value("oomguard_healer_tick_seconds") == pytest.approx(previous_tick)
    assert s.value("oomguard_healer_actions_total", action="down") == 1
    # storm guard
    assert storm.value("oomguard_healer_oom_kills_per_second") == 8.0
    assert s.value("oomguard_healer_actions_total", action="kill_nonessential") == 1
    assert storm.value("oomguard_healer_livelock", cgroup="/app") == 0
    assert s.value("oomguard_healer_livelock", cgroup="/app") == 1
    assert s.value("oomguard_healer_oom_kills_per_second") == 0.0


def test_the_kernel_logs_livelock_gauge_has_one_writer(daemon, app_cgroup) -> None:
    """The healer's memory.events verdict never touches oomguard_oom_livelock:
    a livelock in the app cgroup shows in its own gauge, and the kernel-log
    gauge stays as the kmsg watcher left it, so the alert cannot flap."""
    d, port = daemon
    clock = FakeClock()
    healer = Healer(
        Config(healer=HealerConfig(checks=(), grace=3600.0), layout=LayoutConfig(app_cgroup="app")),
        d.registry, d.cfg.state_dir + "/one-writer.json", d.emit, hooks=d.metrics, clock=clock,
        boot_id="boot", monitor=health.HealthMonitor((), threaded=False), processes=lambda: [],
    )  # fmt: skip
    for oom in (1, 5, 9, 13):
        write_events(app_cgroup, oom, 0)
        healer.tick()
        clock.advance(0.5)
    s = Scrape(port)
    assert s.value("oomguard_healer_livelock", cgroup="/app") == 1
    assert s.value("oomguard_oom_livelock") == 0
    for rec in load_kmsg(KMSG / "linux-6.1-livelock.kmsg", fresh=True):
        d.oomwatch.on_record(rec)
    write_events(app_cgroup, 13, 1)  # the app cgroup's livelock ends
    healer.tick()
    s = Scrape(port)
    assert s.value("oomguard_healer_livelock", cgroup="/app") == 0
    assert s.value("oomguard_oom_livelock") == 1  # the kernel's word, untouched by the healer
