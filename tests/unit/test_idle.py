"""Idle is idle: loops that block on their file descriptors and a stop that
can wake them (host/wakeup.py), a metrics server that does nothing between
scrapes, gauges read when scraped, and peak sampling only where the kernel
keeps no memory.peak. Wake-ups are counted from the kernel's context-switch
counters of the thread itself."""

from __future__ import annotations

import os
import select
import threading
import time
import urllib.request
from types import SimpleNamespace

import pytest

from oomguard import config, daemon
from oomguard.broker import Broker, Granter
from oomguard.forensics.metrics import Metrics
from oomguard.host.kmsg import KmsgFollower
from oomguard.host.wakeup import StopEvent, stop_fd
from oomguard.runs.registry import RunRegistry


def switches(thread: threading.Thread) -> int:
    """Context switches of ``thread`` so far: each wake-up costs at least one."""
    with open(f"/proc/self/task/{thread.native_id}/status") as f:
        return sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_a_stop_event_is_readable_once_set_and_never_cleared():
    stop = StopEvent()
    fd = stop_fd(stop)
    assert fd is not None and not readable(fd) and not stop.is_set()
    stop.set()
    stop.set()  # twice is fine
    assert readable(fd) and stop.is_set() and stop.wait(0)
    with pytest.raises(RuntimeError):
        stop.clear()
    assert stop_fd(threading.Event()) is None


class Quiet(KmsgFollower):
    """A kernel log with nothing in it, ever."""

    def _open(self) -> int:
        self._r, self._w = os.pipe2(os.O_NONBLOCK)
        return self._r

    def _read(self, fd: int) -> bytes:
        raise BlockingIOError


@pytest.mark.parametrize(("pending", "stop_kind"), [(False, StopEvent), (True, StopEvent), (False, threading.Event)])
def test_the_kernel_log_follower_sleeps_until_a_record_unless_something_is_pending(pending, stop_kind):
    calls = []

    def on_idle() -> bool:
        calls.append(time.monotonic())
        return pending

    f = Quiet("/dev/null", on_idle=on_idle, current_boot_id="b", poll_interval=0.05)
    stop = stop_kind()
    t = threading.Thread(target=f.run, args=(stop,), daemon=True)
    t.start()
    time.sleep(0.5)
    stop.set()
    t.join(2)
    assert not t.is_alive()  # the stop woke it
    if pending or stop_kind is threading.Event:
        assert len(calls) >= 5  # a report open (or no fd to wake on): looked at again soon
    else:
        assert len(calls) == 1  # blocked until the stop


def broker(tmp_path) -> Broker:
    cfg = config.Config(protect=config.ProtectConfig(socket=str(tmp_path / "s.sock")))
    return Broker(cfg, Granter(cfg.protect, RunRegistry(tmp_path / "runs.json", "boot")), None)


def test_an_idle_broker_blocks_until_a_connection_or_the_stop(tmp_path):
    b = broker(tmp_path)
    assert b.idle_timeout(stop_wakes=True) is None
    assert b.idle_timeout(stop_wakes=False) == 0.2  # a plain Event is looked at
    stop = StopEvent()
    t = threading.Thread(target=b.serve, args=(stop,), daemon=True)
    t.start()
    assert b.ready.wait(5)
    time.sleep(0.2)
    before = switches(t)
    time.sleep(1.0)
    assert switches(t) - before <= 1  # it was 5 a second on a 0.2 s select
    t0 = time.monotonic()
    stop.set()
    t.join(2)
    assert not t.is_alive() and time.monotonic() - t0 < 1.0


def test_the_metrics_server_does_nothing_between_scrapes_and_samples_on_each():
    m = Metrics()
    sampled = []
    m.before_scrape(lambda: (sampled.append(1), m.set_protected(len(sampled))))
    server = m.serve("127.0.0.1:0")
    try:
        time.sleep(0.2)
        before = switches(server._thread)
        time.sleep(1.0)
        assert switches(server._thread) - before <= 1  # serve_forever woke twice a second
        assert sampled == []  # nothing is read until someone asks
        for n in (1, 2):
            body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5).read().decode()
            assert f"oomguard_protected_processes {float(n)}" in body  # sampled before this very scrape
    finally:
        t0 = time.monotonic()
        server.close()
    assert time.monotonic() - t0 < 1.0 and not server._thread.is_alive()


def test_a_failing_sampler_does_not_fail_the_scrape():
    m = Metrics()
    m.before_scrape(lambda: 1 / 0)
    assert b"oomguard_info" in m.render()


def run(rid: int, cgroup: str | None) -> SimpleNamespace:
    return SimpleNamespace(id=rid, cgroup=cgroup)


def test_peaks_are_sampled_only_for_runs_whose_cgroup_keeps_none(monkeypatch):
    runs = [run(1, "/app/oomguard-run-1"), run(2, "/app/oomguard-run-2"), run(3, "/app"), run(4, None)]
    peaks = {"/app/oomguard-run-1": 10 << 20, "/app": 99 << 20}  # run 2's cgroup has no memory.peak
    read_peak = []
    monkeypatch.setattr(daemon.cgroups, "memory_peak", lambda cg: read_peak.append(cg) or peaks.get(cg))
    monkeypatch.setattr(daemon.procfs, "rss_bytes", lambda pid: 1000 * pid)
    registry = SimpleNamespace(active=lambda: runs, pids=lambda r: [r.id * 10, r.id * 10 + 1])
    fake = SimpleNamespace(registry=registry, _peaks={}, _has_peak={})
    for _ in range(3):
        daemon.Daemon._sample_peaks(fake)  # type: ignore[arg-type]
    # run 1's own cgroup keeps its peak; run 3 only sits in the app's, run 4 has none
    assert fake._peaks == {2: 41000, 3: 61000, 4: 81000}
    assert sorted(read_peak) == ["/app/oomguard-run-1", "/app/oomguard-run-2"]  # once per run, not per pass
    fake.registry = SimpleNamespace(active=lambda: [], pids=lambda r: pytest.fail("no run, no sampling"))
    daemon.Daemon._sample_peaks(fake)  # type: ignore[arg-type]


def test_without_an_exporter_the_daemon_never_imports_prometheus_client(tmp_path):
    """RSS: prometheus_client and the ssl it imports are about 8 MiB."""
    import subprocess
    import sys

    cfg = tmp_path / "oomguard.toml"
    cfg.write_text(f"""
[daemon]
state_dir = "{tmp_path / "state"}"
[protect]
socket = "{tmp_path / "s.sock"}"
[events]
db = "{tmp_path / "events.db"}"
[metrics]
listen = ""
""")
    code = (f"import sys; from oomguard import config, daemon; d = daemon.Daemon(config.load({str(cfg)!r})); "
            "d._sample_gauges(); d.shutdown(); print(sorted(m for m in sys.modules if m.startswith(('prometheus', 'ssl'))))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.strip() == "[]"
