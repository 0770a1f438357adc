"""Processes that belong to a run but may live outside its cgroup.

A run without a cgroup, or one whose cgroup its user could move processes
out of, is followed through fork events: each descendant is a member,
keyed by (pid, start time), and forgotten at its exit. The registry owns
one ``Members`` and calls it under its own lock; indexes by run and by pid
keep a fork and an exit as cheap with ten thousand members as with one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

Key = tuple[int, int]  # (pid, start time)


class Members:
    """Not thread-safe on its own: the registry's lock guards it."""

    def __init__(self) -> None:
        self._run_of: dict[Key, int] = {}
        self._of_run: dict[int, set[Key]] = defaultdict(set)
        self._by_pid: dict[int, Key] = {}

    def add(self, key: Key, run_id: int) -> None:
        self._run_of[key] = run_id
        self._of_run[run_id].add(key)
        self._by_pid[key[0]] = key

    def drop_run(self, run_id: int) -> None:
        for key in self._of_run.pop(run_id, ()):
            if self._run_of.get(key) == run_id:
                del self._run_of[key]
            if self._by_pid.get(key[0]) == key:
                del self._by_pid[key[0]]

    def forget_pid(self, pid: int) -> bool:
        """The process exited; whether it was a member."""
        key = self._by_pid.pop(pid, None)
        if key is None:
            return False
        run_id = self._run_of.pop(key, None)
        if run_id is not None:
            self._of_run[run_id].discard(key)
        return True

    def run_of(self, key: Key) -> int | None:
        return self._run_of.get(key)

    def run_of_pid(self, pid: int) -> int | None:
        """The run of the member that had this pid last (its start time unknown)."""
        key = self._by_pid.get(pid)
        return None if key is None else self._run_of.get(key)

    def of_run(self, run_id: int) -> list[Key]:
        return sorted(self._of_run.get(run_id, ()))

    def pids(self) -> Iterable[int]:
        return self._by_pid.keys()

    def rows(self) -> list[list[int]]:
        """As runs.json keeps them: [pid, start time, run id]."""
        return [[p, s, r] for (p, s), r in self._run_of.items()]
