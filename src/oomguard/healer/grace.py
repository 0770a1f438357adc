"""When the healer may act: the downtime clock and the grace windows.

An outage (incident.Incident) is timed on CLOCK_BOOTTIME: it keeps counting
through suspend and never jumps. Wall time only picks the window: the
time-of-day window in force, in the configured zoneinfo timezone, when the
outage began sets its grace. After the kill, the restart tries wait a
doubling back-off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from datetime import time as dtime
from zoneinfo import ZoneInfo

from oomguard.config import HealerConfig, Window


class Clock:
    """CLOCK_BOOTTIME for elapsed time (it keeps counting through suspend and
    never jumps), wall time only for choosing windows and for people."""

    def boottime(self) -> float:
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def wall(self) -> float:
        return time.time()


# ---------------------------------------------------------------- windows


@dataclass(frozen=True)
class WindowChoice:
    name: str  # "default" or "23:00-07:00"
    grace: float


def window_name(w: Window) -> str:
    return f"{w.start:%H:%M}-{w.end:%H:%M}"


def in_window(w: Window, t: dtime) -> bool:
    """Whether local time-of-day ``t`` is in [start, end); wraps midnight."""
    t = t.replace(second=0, microsecond=0, tzinfo=None)
    if w.start < w.end:
        return w.start <= t < w.end
    return t >= w.start or t < w.end


def choose_window(cfg: HealerConfig, wall: float) -> WindowChoice:
    """The window in force at wall-clock time ``wall`` (epoch seconds), read in
    the configured timezone; zoneinfo maps the instant to local time, so DST
    changes are handled by the tz database, not by us."""
    local = datetime.fromtimestamp(wall, ZoneInfo(cfg.timezone))
    for w in cfg.windows:
        if in_window(w, local.time()):
            return WindowChoice(window_name(w), w.grace)
    return WindowChoice("default", cfg.grace)


# ---------------------------------------------------------------- restarts


def backoff_delays(cfg: HealerConfig) -> list[float]:
    """The wait after each restart try: restart_backoff doubling, capped at
    restart_backoff_max; one entry per try."""
    return [
        min(cfg.restart_backoff * 2**i, cfg.restart_backoff_max) for i in range(cfg.restart_tries)
    ]


def fmt_duration(seconds: float) -> str:
    """90 -> "1m30s": durations as the config writes them."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
