"""Health checks for the auto-healer: HTTP(S), TCP, the MySQL greeting, commands.

A probe answers one question, "does this endpoint work right now?", within
its time-out, and never raises. Each kind lives in its own module
(probe_tcp, probe_http, probe_mysql; commands for command checks);
``probe(check)`` picks one. health.HealthMonitor runs them on a schedule.
"""

from __future__ import annotations

import logging
import shlex
import threading
from collections.abc import Callable, Sequence

from oomguard.config import Check
from oomguard.healer.commands import run_command
from oomguard.healer.probe_base import Cancel, ProbeResult

log = logging.getLogger(__name__)


def probe_command(argv: Sequence[str], timeout: float, cancel: Cancel | None = None) -> ProbeResult:
    """Healthy when the command exits 0 within the time-out."""
    r = run_command(argv, timeout, cancel=cancel)
    first = r.output.splitlines()[0][:200] if r.output else ""
    if r.timed_out:
        return ProbeResult(False, f"command killed after {timeout:g}s time-out")
    if r.returncode is None:
        return ProbeResult(False, r.output or "command did not start")
    if r.returncode != 0:
        return ProbeResult(False, f"exit {r.returncode}" + (f": {first}" if first else ""))
    return ProbeResult(True, "exit 0")


def probe(check: Check, cancel: Cancel | None = None) -> ProbeResult:
    """Run one check once; never raises."""
    # Each kind is imported on its first probe: http.client brings ssl (about
    # 4 MiB of the daemon's RSS), which a host without HTTP checks never needs.
    try:
        if check.kind == "http":
            from oomguard.healer.probe_http import probe_http

            return probe_http(check.target, check.timeout, check.expect_status, cancel)
        if check.kind == "tcp":
            from oomguard.healer.probe_tcp import probe_tcp

            return probe_tcp(check.target, check.timeout, cancel)
        if check.kind == "mysql":
            from oomguard.healer.probe_mysql import probe_mysql

            return probe_mysql(check.target, check.timeout, cancel)
        if check.kind == "command":
            return probe_command(shlex.split(check.target), check.timeout, cancel)
        return ProbeResult(False, f"unknown check kind {check.kind!r}")
    except Exception as e:  # noqa: BLE001 - a probe must never take the monitor down
        log.exception("check %s: probe crashed", check.name)
        return ProbeResult(False, f"probe crashed: {e.__class__.__name__}: {e}")


ProbeFn = Callable[[Check, Cancel], ProbeResult]


def probe_with_deadline(check: Check, slack: float = 1.0, probe_fn: ProbeFn = probe) -> ProbeResult:
    """One probe, for callers without a monitor (e.g. a CLI): returns within
    about ``timeout + slack`` however the endpoint behaves."""
    result: list[ProbeResult] = []
    cancel = Cancel()
    t = threading.Thread(
        target=lambda: result.append(probe_fn(check, cancel)),
        name=f"probe-{check.name}",
        daemon=True,
    )
    t.start()
    t.join(check.timeout + slack)
    if result:
        return result[0]
    cancel.cancel()
    return ProbeResult(False, f"no answer within {check.timeout:g}s (probe abandoned)")
