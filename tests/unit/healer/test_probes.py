"""One probe of any kind: command checks, and the deadline for callers without a monitor."""

from __future__ import annotations

import threading
import time

from probe_servers import alive, check

from oomguard.healer import probe_base, probes


def test_command_exit_status():
    assert probes.probe_command(["true"], 5).ok
    r = probes.probe_command(["sh", "-c", "echo broken >&2; exit 3"], 5)
    assert not r.ok and "exit 3" in r.detail and "broken" in r.detail


def test_command_not_found_is_down():
    r = probes.probe_command(["/nonexistent/oomguard-check"], 5)
    assert not r.ok


def test_command_never_runs_through_a_shell(tmp_path):
    marker = tmp_path / "pwned"
    r = probes.probe_command(["echo", f"; touch {marker}"], 5)
    assert r.ok
    assert not marker.exists()


def test_command_killed_at_timeout_with_its_children(tmp_path):
    pidfile = tmp_path / "child.pid"
    r = probes.probe_command(["sh", "-c", f"sleep 1000 & echo $! > {pidfile}; wait"], 0.5)
    assert not r.ok and "time-out" in r.detail
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while alive(child):
        assert time.monotonic() < deadline, "the check's background child survived"
        time.sleep(0.05)


def test_probe_with_deadline_abandons_a_probe_that_ignores_its_timeout():
    release = threading.Event()

    def stubborn(chk, cancel):
        release.wait(60)  # ignores the time-out and the cancel
        return probe_base.ProbeResult(True, "late")

    t0 = time.monotonic()
    r = probes.probe_with_deadline(check("command", "x", timeout=0.2), slack=0.2, probe_fn=stubborn)
    elapsed = time.monotonic() - t0
    release.set()
    assert not r.ok and "abandoned" in r.detail
    assert elapsed < 5  # generous: the point is that it did not wait 60 s
