"""The enforcer's counters, shared by its parts (``walks``, ``appcgroup``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EnforcerStats:
    events: int = 0
    polls: int = 0
    writes: int = 0
    errors: int = 0
    placed: int = 0
    place_errors: int = 0
    looks: int = 0  # processes looked at (a /proc snapshot each)
    dropped: int = 0  # exited before their look was due: nothing read
    resyncs: int = 0  # walks of all of /proc
    lost: int = 0  # times the connector said events were lost


__all__ = ["EnforcerStats"]
