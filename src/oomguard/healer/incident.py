"""One outage, as the healer tracks it, and the file that keeps it.

An ``Incident`` is timed on CLOCK_BOOTTIME together with the boot id, so a
persisted incident survives a daemon restart and ignores wall-clock jumps
(grace.py has the clock and the windows). ``IncidentFile`` writes it, with
the healer's last actions, atomically, and reads it back on start: an
incident of an earlier boot is void, and a phase cut short resumes where
it is safe to.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

from oomguard.host import statefile

log = logging.getLogger(__name__)

KEEP_ACTIONS = 20  # the last actions kept for status() and across restarts


class Phase(StrEnum):
    WAITING = "waiting"  # down, within the grace
    TERMINATING = "terminating"  # SIGTERM sent, up to term_timeout
    KILLING = "killing"  # SIGKILL sent, up to kill_timeout
    RESTARTING = "restarting"  # a restart try is running
    VERIFYING = "verifying"  # the back-off after a try: do the checks pass?
    GAVE_UP = "gave_up"  # the restart tries ran out
    DRY_RUN = "dry_run"  # the grace ran out in dry-run mode: nothing done
    IDLE = "idle"  # acted; waiting for the checks to pass


# Phases that must run to their end, even once the shop is healthy again.
BUSY = frozenset({Phase.TERMINATING, Phase.KILLING, Phase.RESTARTING})


@dataclass
class Incident:
    """One down period, persisted. Times are CLOCK_BOOTTIME seconds of the
    boot named by boot_id; start_wall only chose the window."""

    boot_id: str
    start: float
    start_wall: float
    window: str
    grace: float
    checks: list[str] = field(default_factory=list)
    phase: Phase = Phase.WAITING
    tries: int = 0
    deadline: float | None = None
    recovered: float | None = None
    killed: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.phase = Phase(self.phase)  # ValueError for a phase we do not know

    def elapsed(self, now: float) -> float:
        end = self.recovered if self.recovered is not None else now
        return max(0.0, end - self.start)

    @property
    def down(self) -> bool:
        return self.recovered is None


class IncidentFile:
    """The healer's state file: the incident (or none) and the last actions."""

    def __init__(self, path: str | os.PathLike[str], boot_id: str):
        self.path = Path(path)
        self.boot_id = boot_id

    def load(self) -> tuple[Incident | None, list[dict]]:
        """The incident to resume (None if none, unreadable or of an earlier
        boot), and the last actions recorded."""
        data = statefile.read_json(self.path, {}) or {}
        actions = [a for a in data.get("last_actions", [])[-KEEP_ACTIONS:] if isinstance(a, dict)]
        raw = data.get("incident")
        if not isinstance(raw, dict):
            return None, actions
        try:
            inc = Incident(**raw)
        except (TypeError, ValueError):
            log.warning("ignoring an unreadable incident in %s", self.path)
            return None, actions
        if inc.boot_id != self.boot_id:
            log.info("incident from boot %s is void after a reboot", inc.boot_id)
            self.save(None, actions)
            return None, actions
        if inc.phase in (Phase.TERMINATING, Phase.KILLING):
            inc.phase, inc.deadline = Phase.WAITING, None  # the grace had expired: act again
        elif inc.phase == Phase.RESTARTING:
            # The try's outcome is unknown: go on with the next one at once.
            inc.phase, inc.deadline = Phase.VERIFYING, None
        return inc, actions

    def save(self, incident: Incident | None, actions: Iterable[dict]) -> None:
        try:
            statefile.write_json_atomic(
                self.path,
                {
                    "version": 1,
                    "incident": asdict(incident) if incident else None,
                    "last_actions": list(actions),
                },
            )
        except OSError as e:
            log.error("cannot persist healer state to %s: %s", self.path, e)
