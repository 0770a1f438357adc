"""The health monitor: runs each check at its own interval and counts
consecutive failures; it never waits on a probe:

* every probe has its own socket or process time-out, and
* it runs in a thread of its own with a watchdog deadline (time-out plus a
  little slack). At the deadline the monitor shuts the probe's sockets and
  kills its process group, records a failure, and *abandons* the thread.
  Some waits cannot be interrupted at all (getaddrinfo on a dead resolver,
  a read from a stalled filesystem), so abandoning, not joining, is what
  keeps the caller's loop on time. Hung threads per check are capped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from oomguard.config import Check
from oomguard.healer.probe_base import Cancel, ProbeResult
from oomguard.healer.probes import ProbeFn, probe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Observation:
    """One finished probe. Times are on the caller's clock (the healer uses
    CLOCK_BOOTTIME): ``started`` when the probe was launched, ``finished``
    when its result was collected."""

    check: str
    ok: bool
    detail: str
    started: float
    finished: float
    abandoned: bool = False


@dataclass
class _InFlight:
    thread: threading.Thread | None
    cancel: Cancel
    started: float
    deadline: float
    result: list[ProbeResult] = field(default_factory=list)


@dataclass
class CheckState:
    check: Check
    failures: int = 0  # consecutive
    streak_start: float | None = None  # launch time of the first failure of the streak
    last_ok: bool | None = None
    last_detail: str = ""
    last_started: float | None = None
    last_finished: float | None = None
    probes: int = 0
    next_due: float = 0.0
    in_flight: _InFlight | None = None
    hung: list[tuple[threading.Thread, Cancel]] = field(default_factory=list)

    @property
    def down(self) -> bool:
        return self.failures >= self.check.failures


class Monitor(Protocol):
    """What the healer needs of a HealthMonitor (tests may script one)."""

    def poll(self, now: float) -> list[Observation]: ...
    def probe_soon(self) -> None: ...
    def close(self) -> None: ...
    def down(self) -> bool: ...
    def down_checks(self) -> list[str]: ...
    def down_since(self) -> float | None: ...
    def healthy(self) -> bool: ...
    def status(self) -> dict[str, dict]: ...


class HealthMonitor:
    """Runs the checks at their intervals; ``poll(now)`` never blocks.

    ``threaded=False`` runs probes inline in poll(), for tests that drive the
    monitor with a fake clock and a scripted probe function."""

    def __init__(
        self,
        checks: Sequence[Check],
        probe_fn: ProbeFn = probe,
        *,
        threaded: bool = True,
        slack: float = 1.0,
        max_hung: int = 4,
    ):
        self.checks = tuple(checks)
        self.probe_fn = probe_fn
        self.threaded = threaded
        self.slack = slack
        self.max_hung = max_hung
        self._lock = threading.Lock()
        self.states: dict[str, CheckState] = {c.name: CheckState(c) for c in self.checks}
        # Called from a probe's thread when it finishes (the healer's wake-up),
        # so the result is collected now rather than at the next tick.
        self.on_finished: Callable[[], None] = lambda: None

    # ------------------------------------------------------------ driving

    def poll(self, now: float) -> list[Observation]:
        """Collect finished probes, abandon overdue ones, launch due ones."""
        out: list[Observation] = []
        with self._lock:
            for cs in self.states.values():
                cs.hung = [(t, c) for t, c in cs.hung if t.is_alive()]
                fl = cs.in_flight
                if fl is not None:
                    if fl.result:
                        out.append(self._record(cs, fl.result[0], fl.started, now))
                        cs.in_flight = None
                    elif now >= fl.deadline:
                        fl.cancel.cancel()
                        if fl.thread is not None and fl.thread.is_alive():
                            cs.hung.append((fl.thread, fl.cancel))
                        res = ProbeResult(
                            False, f"no answer within {cs.check.timeout:g}s (probe abandoned)"
                        )
                        out.append(self._record(cs, res, fl.started, now, abandoned=True))
                        cs.in_flight = None
                if cs.in_flight is None and now >= cs.next_due:
                    cs.next_due = now + cs.check.interval
                    if len(cs.hung) >= self.max_hung:
                        res = ProbeResult(
                            False, f"{len(cs.hung)} earlier probes still hung; not starting another"
                        )
                        out.append(self._record(cs, res, now, now))
                    else:
                        obs = self._launch(cs, now)
                        if obs is not None:
                            out.append(obs)
        return out

    def _launch(self, cs: CheckState, now: float) -> Observation | None:
        cancel = Cancel()
        if not self.threaded:
            return self._record(cs, self._safe_probe(cs.check, cancel), now, now)
        fl = _InFlight(None, cancel, now, now + cs.check.timeout + self.slack)

        def work() -> None:
            fl.result.append(self._safe_probe(cs.check, cancel))
            self.on_finished()

        fl.thread = threading.Thread(target=work, name=f"probe-{cs.check.name}", daemon=True)
        cs.in_flight = fl
        fl.thread.start()
        return None

    def _safe_probe(self, check: Check, cancel: Cancel) -> ProbeResult:
        try:
            return self.probe_fn(check, cancel)
        except Exception as e:  # noqa: BLE001 - an injected probe must not kill the loop
            return ProbeResult(False, f"probe crashed: {e.__class__.__name__}: {e}")

    def _record(
        self, cs: CheckState, res: ProbeResult, started: float, now: float, abandoned: bool = False
    ) -> Observation:
        cs.probes += 1
        if res.ok:
            cs.failures, cs.streak_start = 0, None
        else:
            if cs.failures == 0:
                cs.streak_start = started
            cs.failures += 1
        if cs.last_ok != res.ok or (not res.ok and cs.failures == cs.check.failures):
            level = logging.INFO if res.ok else logging.WARNING
            log.log(
                level,
                "check %s: %s (%d consecutive failures)",
                cs.check.name,
                res.detail,
                cs.failures,
            )
        cs.last_ok, cs.last_detail = res.ok, res.detail
        cs.last_started, cs.last_finished = started, now
        return Observation(cs.check.name, res.ok, res.detail, started, now, abandoned)

    def close(self) -> None:
        """Abort every probe still running (sockets shut, command process
        groups killed): nothing a check started outlives the monitor."""
        with self._lock:
            for cs in self.states.values():
                if cs.in_flight is not None:
                    cs.in_flight.cancel.cancel()
                    cs.in_flight = None
                for _, cancel in cs.hung:
                    cancel.cancel()

    def probe_soon(self) -> None:
        """Make every check due at the next poll (after a restart, to verify)."""
        with self._lock:
            for cs in self.states.values():
                cs.next_due = 0.0

    # ------------------------------------------------------------ queries

    def calm_until(self) -> float | None:
        """When poll() next has work if all is well: the earliest probe due
        or in-flight deadline (inf without checks). None while a check is
        failing, so that the caller keeps a close watch."""
        with self._lock:
            if any(cs.failures or cs.last_ok is False for cs in self.states.values()):
                return None
            times = [cs.in_flight.deadline if cs.in_flight is not None else cs.next_due for cs in self.states.values()]
        return min(times, default=float("inf"))

    def down(self) -> bool:
        """Some check has failed its threshold number of times in a row."""
        with self._lock:
            return any(cs.down for cs in self.states.values())

    def down_checks(self) -> list[str]:
        with self._lock:
            return [n for n, cs in self.states.items() if cs.down]

    def down_since(self) -> float | None:
        """Launch time of the first failing probe of the earliest down check."""
        with self._lock:
            starts = [
                cs.streak_start
                for cs in self.states.values()
                if cs.down and cs.streak_start is not None
            ]
        return min(starts) if starts else None

    def healthy(self) -> bool:
        """Every check's latest probe passed (False until all have run)."""
        with self._lock:
            return bool(self.states) and all(cs.last_ok is True for cs in self.states.values())

    def status(self) -> dict[str, dict]:
        with self._lock:
            return {
                name: {
                    "kind": cs.check.kind,
                    "target": cs.check.target,
                    "healthy": cs.last_ok,
                    "down": cs.down,
                    "failures": cs.failures,
                    "threshold": cs.check.failures,
                    "detail": cs.last_detail,
                    "probes": cs.probes,
                    "in_flight": cs.in_flight is not None,
                    "hung_probes": len([t for t, _ in cs.hung if t.is_alive()]),
                }
                for name, cs in self.states.items()
            }
