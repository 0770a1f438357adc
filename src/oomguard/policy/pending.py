"""Processes waiting for the enforcer's look, one entry per pid.

A fork, an exec and a uid change of one process within a moment make one
look, not three, and a process that exits before its look is due costs
nothing beyond its events: in an exec storm most processes live for a few
milliseconds and never need a value. Entries stay in the order they came in,
which is also the order they fall due (the delay is fixed), so a parent seen
before its child is looked at first.
"""

from __future__ import annotations

from dataclasses import dataclass

MISSING = object()  # no parent class known when the fork was seen


@dataclass
class Pending:
    due: float
    parent: int | None = None  # the parent a fork event named
    hint: object = MISSING  # that parent's class at the fork, if it was known
    start: int | None = None  # the start time to expect (second looks only)
    fork: bool = False  # a fresh fork: it gets a second look once settled


class PendingQueue:
    """Pids to look at once ``delay`` has passed since their first event,
    at most ``limit`` of them (``overflowed`` says when one was lost)."""

    def __init__(self, delay: float, limit: int):
        self.delay = delay
        self.limit = limit
        self.overflowed = False
        self._q: dict[int, Pending] = {}

    def add(self, pid: int, now: float, **fields: object) -> bool:
        """Queue a look at ``pid`` (merged with one already queued, which
        keeps its place and its due time); False if the queue was full."""
        entry = self._q.get(pid)
        if entry is None:
            if len(self._q) >= self.limit:
                self.overflowed = True
                return False
            self._q[pid] = Pending(now + self.delay, **fields)  # type: ignore[arg-type]
            return True
        if fields.get("fork"):
            # a second fork naming this pid: its exit was lost, it is another process
            entry.parent, entry.hint = fields.get("parent"), fields.get("hint", MISSING)  # type: ignore[assignment]
            entry.fork = True
        return True

    def drop(self, pid: int) -> bool:
        """The process exited: its look is not needed. True if one was queued."""
        return self._q.pop(pid, None) is not None

    def pop_due(self, now: float, limit: int) -> list[tuple[int, Pending]]:
        """Up to ``limit`` entries whose time has come, oldest first."""
        out: list[tuple[int, Pending]] = []
        for pid, entry in self._q.items():
            if entry.due > now or len(out) >= limit:
                break
            out.append((pid, entry))
        for pid, _ in out:
            del self._q[pid]
        return out

    def next_due(self) -> float | None:
        for entry in self._q.values():
            return entry.due
        return None

    def __contains__(self, pid: object) -> bool:
        return pid in self._q

    def __len__(self) -> int:
        return len(self._q)

    def clear(self) -> None:
        self._q.clear()


__all__ = ["MISSING", "Pending", "PendingQueue"]
