"""One table of the live processes, indexed by pid, fed by process events.

Keys are ``(pid, starttime)`` as everywhere in oomguard (a reused pid is
another process), but entries are stored as ``pid -> {starttime: value}``, so
that what one event does (an exec, an exit, a parent's lookup) touches that
pid's entries only: its cost does not grow with the number of processes
known. The enforcer keeps its classes here; the table is meant to be shared
by anything that follows processes through events (``Enforcer.table``).

Not thread-safe by itself: its owner holds its own lock around it.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Generic, TypeVar

V = TypeVar("V")
Key = tuple[int, int]


class ProcTable(MutableMapping[Key, V], Generic[V]):
    """A mapping of (pid, starttime) to a value, with per-pid operations."""

    def __init__(self) -> None:
        self._by_pid: dict[int, dict[int, V]] = {}
        self._count = 0

    # ------------------------------------------------------------ the mapping

    def __getitem__(self, key: Key) -> V:
        return self._by_pid[key[0]][key[1]]

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, tuple) or len(key) != 2:
            return False
        entries = self._by_pid.get(key[0])
        return entries is not None and key[1] in entries

    def __setitem__(self, key: Key, value: V) -> None:
        entries = self._by_pid.setdefault(key[0], {})
        if key[1] not in entries:
            self._count += 1
        entries[key[1]] = value

    def __delitem__(self, key: Key) -> None:
        entries = self._by_pid[key[0]]
        del entries[key[1]]
        self._count -= 1
        if not entries:
            del self._by_pid[key[0]]

    def __iter__(self) -> Iterator[Key]:
        for pid, entries in list(self._by_pid.items()):
            for start in list(entries):
                yield (pid, start)

    def __len__(self) -> int:
        return self._count

    def clear(self) -> None:
        self._by_pid.clear()
        self._count = 0

    # ------------------------------------------------------------ by pid

    def entries(self, pid: int) -> dict[int, V]:
        """A copy of one pid's entries: starttime -> value."""
        return dict(self._by_pid.get(pid, {}))

    def forget(self, pid: int) -> int:
        """Drop every entry of one pid (an exec or an exit); how many."""
        entries = self._by_pid.pop(pid, None)
        if not entries:
            return 0
        self._count -= len(entries)
        return len(entries)

    def latest(self, pid: int, upto: int | None = None) -> tuple[int, V] | None:
        """The entry of ``pid`` that started last (no later than ``upto``):
        the parent a fork event named, when a reused pid may also be known."""
        entries = self._by_pid.get(pid)
        if not entries:
            return None
        starts = [s for s in entries if upto is None or s <= upto]
        if not starts:
            return None
        start = max(starts)
        return start, entries[start]

    def pids(self) -> list[int]:
        return list(self._by_pid)

    def replace(self, other: MutableMapping[Key, V]) -> None:
        """Become ``other`` in place (a resync's result), so that whoever
        holds this table sees the new contents."""
        self.clear()
        for key, value in other.items():
            self[key] = value


__all__ = ["Key", "ProcTable"]
