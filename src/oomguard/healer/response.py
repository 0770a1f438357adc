"""The healer's response to an outage that outlasts its grace.

Phase by phase (incident.Phase): end every protected run (killer.Kill:
SIGTERM, then SIGKILL after ``term_timeout``, then confirm within
``kill_timeout``), restart the services (restart.Restarter), verify with
the checks during a doubling back-off (grace.backoff_delays), and give up
when the tries run out. In dry-run mode it says what it would do and does
nothing. Each call is short: the healer's tick drives it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from oomguard.config import HealerConfig
from oomguard.healer import health
from oomguard.healer.actions import decide
from oomguard.healer.grace import backoff_delays, fmt_duration
from oomguard.healer.incident import Incident, Phase
from oomguard.healer.killer import Kill
from oomguard.healer.restart import Restarter

log = logging.getLogger(__name__)

RecordFn = Callable[..., None]  # record(data, uids=(), dry_run=None)


class Response:
    """``select_targets()`` names whom to end; ``record(data, uids)`` keeps
    and emits an action; ``save()`` persists the incident after each move."""

    def __init__(
        self,
        cfg: HealerConfig,
        monitor: health.Monitor,
        restarter: Restarter,
        select_targets: Callable[[], list[Kill]],
        record: RecordFn,
        save: Callable[[], None],
        kill_timeout: float,
    ):
        self.cfg = cfg
        self.monitor = monitor
        self.restarter = restarter
        self._select_targets = select_targets
        self._record = record
        self._save = save
        self.kill_timeout = kill_timeout
        self._kills: list[Kill] = []

    def _decide(self, message: str, *args: object) -> None:
        decide(log, self.cfg.dry_run, message, *args)

    def close(self) -> None:
        """Close the pidfds of kills left unfinished (on shutdown)."""
        for k in self._kills:
            k.close()

    def advance(self, now: float, inc: Incident) -> None:
        """Move ``inc`` on by what is due at ``now``."""
        if inc.phase == Phase.WAITING:
            if inc.down and now - inc.start >= inc.grace:
                self._act(now, inc)
        elif inc.phase == Phase.TERMINATING:
            if all(k.gone() for k in self._kills) or now >= (inc.deadline or now):
                for k in self._kills:
                    if not k.gone():
                        self._decide("%s: still there after SIGTERM; SIGKILL", k.label)
                        k.kill()
                inc.phase, inc.deadline = Phase.KILLING, now + self.kill_timeout
                self._save()
        elif inc.phase == Phase.KILLING:
            left = [k for k in self._kills if not k.gone()]
            if not left or now >= (inc.deadline or now):
                self._finish_kills(now, inc)
                self._after_kills(now, inc)
            else:
                for k in left:
                    k.kill()  # select again until nothing of it is left
        elif inc.phase == Phase.RESTARTING:
            self._collect_restart(now, inc)
        elif inc.phase == Phase.VERIFYING:
            if inc.down and now >= (inc.deadline or now):
                if inc.tries < self.cfg.restart_tries:
                    self._start_restart(now, inc)
                else:
                    self._decide("services still down after %d restart tries; giving up", inc.tries)
                    self._record(
                        {
                            "action": "gave_up",
                            "tries": inc.tries,
                            "checks": self.monitor.down_checks(),
                        }
                    )
                    inc.phase = Phase.GAVE_UP
                    self._save()

    def _why(self, inc: Incident, now: float) -> str:
        return (
            f"the shop was down for {fmt_duration(inc.elapsed(now))}, longer than the "
            f"{fmt_duration(inc.grace)} grace ({inc.window} window)"
        )

    def _act(self, now: float, inc: Incident) -> None:
        why = self._why(inc, now)
        targets = self._select_targets()
        if not targets:
            self._decide("grace over (%s): no protected process runs; nothing to kill", why)
        if self.cfg.dry_run:
            self._pretend(inc, targets, why)
            return
        self._kills = targets
        for k in targets:
            self._decide("killing %s: %s", k.label, why)
            k.term()
            self._record(
                {
                    "action": "term",
                    "target": k.label,
                    "run": k.run.id if k.run else None,
                    "owner": k.user,
                    "pids": sorted(h.pid for h in k.handles.values()),
                    "reason": why,
                },
                [k.uid],
            )
        if targets:
            inc.phase, inc.deadline = Phase.TERMINATING, now + self.cfg.term_timeout
            self._save()
        else:
            self._after_kills(now, inc)

    def _pretend(self, inc: Incident, targets: list[Kill], why: str) -> None:
        """Dry run: say what would be killed and restarted, do nothing."""
        for k in targets:
            self._decide("would kill %s: %s", k.label, why)
            self._record(
                {
                    "action": "would_kill",
                    "target": k.label,
                    "run": k.run.id if k.run else None,
                    "owner": k.user,
                    "reason": why,
                },
                [k.uid],
            )
        names = [s.name for s in self.cfg.services]
        self._decide("would restart services %s", ",".join(names) or "(none configured)")
        self._record({"action": "would_restart", "services": names, "reason": why})
        inc.phase = Phase.DRY_RUN
        self._save()

    def _finish_kills(self, now: float, inc: Incident) -> None:
        why = self._why(inc, now)
        for k in self._kills:
            rec = k.finish(why)
            if rec["action"] == "killed" and k.run is not None:
                inc.killed.append(k.run.id)
            level = logging.ERROR if rec["action"] == "kill_failed" else logging.WARNING
            log.log(
                level, "%s: %s via %s; left: %s; spared: %s",
                k.label, rec["action"], rec["method"], rec.get("left", []), rec["skipped"],
            )  # fmt: skip
            self._record(rec, [k.uid])
        self._kills = []

    def _after_kills(self, now: float, inc: Incident) -> None:
        if not inc.down:
            inc.phase = Phase.IDLE  # healthy again meanwhile: no restart needed
            self._save()
            return
        if not self.cfg.services:
            self._decide("no services configured to restart; waiting for the checks")
            inc.phase, inc.deadline = Phase.IDLE, None
            self._save()
            return
        self._start_restart(now, inc)

    def _start_restart(self, now: float, inc: Incident) -> None:
        inc.tries += 1
        inc.phase = Phase.RESTARTING
        self._save()
        self._decide(
            "restarting %s (try %d of %d)",
            ",".join(s.name for s in self.cfg.services), inc.tries, self.cfg.restart_tries,
        )  # fmt: skip
        self.restarter.start()
        if not self.restarter.background:
            self._collect_restart(now, inc)

    def _collect_restart(self, now: float, inc: Incident) -> None:
        results = self.restarter.take()
        if results is None:
            return
        delay = backoff_delays(self.cfg)[inc.tries - 1]
        for r in results:
            if not r["ok"]:
                log.error("restart of %s failed: %s", r["service"], r["output"] or r["returncode"])
        self._record(
            {
                "action": "restart",
                "try": inc.tries,
                "tries": self.cfg.restart_tries,
                "services": results,
                "verify_for": delay,
            },
        )
        self.monitor.probe_soon()
        inc.phase, inc.deadline = Phase.VERIFYING, now + delay
        self._save()
