"""Telling the owners of protected runs before the healer acts.

When the shop goes down while protected runs exist, each run's owner is told
at once, on the run's terminal and as a "warning" event (which the hooks
and `oomguard motd` pass on): the shop is down, which run, when the healer
will stop it (local time), and how to stop it themselves. Told again
``warn_before`` ahead of that time, and told that the warning is void when
the shop recovers in time. A run granted during the outage is warned at
the next tick. What was said lives with the process: a daemon restarted
mid-incident may say it once more, never less.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from zoneinfo import ZoneInfo

from oomguard.config import HealerConfig
from oomguard.healer.grace import fmt_duration
from oomguard.healer.incident import Incident, Phase
from oomguard.healer.tty import tell_tty
from oomguard.runs.run import Run

RecordFn = Callable[[str, dict, Iterable[int]], object]  # ActionLog.record(kind, data, uids)
TellFn = Callable[[str, int, str], bool]  # tell_tty(path, uid, text)

DOWN, FINAL, VOID = "down_warning", "final_warning", "warning_void"


class RunWarnings:
    def __init__(
        self,
        cfg: HealerConfig,
        active_runs: Callable[[], list[Run]],
        record: RecordFn,
        wall: Callable[[], float],
        tell: TellFn = tell_tty,
    ):
        self.cfg = cfg
        self._active_runs = active_runs
        self._record = record
        self._wall = wall
        self._tell = tell
        self._incident: float | None = None  # the start of the incident warned about
        self._acts_at: float | None = None  # wall time the healer acts at, as first told
        self._said: dict[int, set[str]] = {}  # run id -> what it was told

    def update(self, now: float, inc: Incident | None) -> None:
        """One tick; ``now`` on the incident's clock (CLOCK_BOOTTIME)."""
        if inc is None or self._incident not in (None, inc.start):
            self._forget()
        if inc is None:
            return
        self._incident = inc.start
        if not inc.down or inc.phase != Phase.WAITING:
            return  # acting now: the killer's own notice follows
        left = max(0.0, inc.grace - inc.elapsed(now))
        # Said once per incident, so every message names the same time even
        # if a tick ran late (its ``now`` older than the wall clock read here).
        if self._acts_at is None:
            self._acts_at = self._wall() + left
        acts_at = self._acts_at
        for run in self._active_runs():
            said = self._said.setdefault(run.id, set())
            if DOWN not in said:
                said.add(DOWN)
                self._say(DOWN, run, inc, acts_at, left)
            if FINAL not in said and self.cfg.warn_before < inc.grace and left <= self.cfg.warn_before:
                said.add(FINAL)
                self._say(FINAL, run, inc, acts_at, left)

    def recovered(self, inc: Incident) -> None:
        """The shop is up again: void the warnings if the healer had not acted."""
        if inc.phase == Phase.WAITING and self._incident == inc.start:
            self._void()
        self._forget()

    def _void(self) -> None:
        live = {r.id: r for r in self._active_runs()}
        for run_id, said in self._said.items():
            if said and VOID not in said and run_id in live:
                said.add(VOID)
                run = live[run_id]
                text = (f"oomguard: the shop is up again; your protected run {run.id} will not be stopped "
                        "(the warning is void)")  # fmt: skip
                self._send(VOID, run, text, {})

    def _forget(self) -> None:
        self._incident = None
        self._acts_at = None
        self._said.clear()

    def _say(self, action: str, run: Run, inc: Incident, acts_at: float, left: float) -> None:
        at = datetime.fromtimestamp(acts_at, ZoneInfo(self.cfg.timezone)).strftime("%H:%M:%S %Z")
        lead = "" if action == DOWN else f"in {fmt_duration(left)}, "
        text = (
            f"oomguard: the shop is down (checks {', '.join(inc.checks)} failing). Your protected run "
            f"{run.id} ({run.command[:60]}) will be stopped {lead}at {at} ({inc.window} grace "
            f"{fmt_duration(inc.grace)}) unless the shop recovers. To stop it yourself: oomguard kill-run {run.id}"
        )
        self._send(action, run, text, {"acts_at": acts_at, "time_left": round(left, 3), "window": inc.window,
                                       "grace": inc.grace, "checks": list(inc.checks)})  # fmt: skip

    def _send(self, action: str, run: Run, text: str, extra: dict) -> None:
        told = bool(run.tty) and self._tell(run.tty, run.uid, text)
        self._record("warning", {"action": action, "run": run.id, "user": run.user, "uid": run.uid,
                                 "command": run.command, "message": text, "told_tty": told, **extra},
                     [run.uid])  # fmt: skip
