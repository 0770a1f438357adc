"""The oom_score_adj the enforcer last saw or wrote, per known process.

The enforcer looks at every process it follows (a ``procfs.snapshot`` with
its ``oom_score_adj``) and knows the value after each write it makes; this
book keeps both, so that ``oomguard status`` finds the processes at -1000
without a walk of /proc. It is the enforcer's, written under its lock only.

What it cannot know: a value someone else changes later without an event
(a write to /proc/<pid>/oom_score_adj is no process event) shows up only at
the next resync. Readers therefore take it for candidates and check each
against /proc now.

Entries are kept by pid, each with its start time: a pid names one live
process at a time, and a reused pid's first look replaces the entry of the
one that had it (a later start time wins), so an exit is one dict pop and
no event reads more than its own pid's entry. Those at -1000 are also kept
apart, so that status finds them without a scan of all the others.
"""

from __future__ import annotations

from collections.abc import Iterable

from oomguard.host.procfs import OOM_SCORE_ADJ_MIN as PROTECTED
from oomguard.host.proctable import Key
from oomguard.policy.decisions import Change, Decision


class AdjBook:
    """pid -> (start time, the last oom_score_adj seen or written), and the
    (pid, start time) of those at -1000. Not thread-safe by itself: the
    enforcer's lock."""

    def __init__(self) -> None:
        self._adj: dict[int, tuple[int, int]] = {}
        self._protected: dict[int, int] = {}  # pid -> start time; the few at -1000
        self.complete = False  # a walk has filled it: until then it misses what started before

    def note(self, key: Key, value: int) -> None:
        pid, start = key
        old = self._adj.get(pid)
        if old is not None and (old[0] > start or old[0] == start and old[1] == value):
            return  # nothing new, or a look at the pid's previous process, older than what is known
        self._adj[pid] = (start, value)
        if value == PROTECTED:
            self._protected[pid] = start
        else:
            self._protected.pop(pid, None)

    def saw(self, decisions: Iterable[Decision]) -> None:
        """What looks read (the value before any write of theirs)."""
        for d in decisions:
            self.note(d.key, d.current)

    def wrote(self, changes: Iterable[Change]) -> None:
        """What writes set; a failed or dry-run write changed nothing."""
        for c in changes:
            if c.ok and not c.dry_run:
                self.note((c.pid, c.starttime), c.new)

    def forget(self, pid: int) -> None:
        """The process exited."""
        self._adj.pop(pid, None)
        self._protected.pop(pid, None)

    def keep_only(self, pids: set[int]) -> None:
        """A walk is about to note every process it saw: drop everything but
        ``pids`` (those events touched meanwhile, whose look is newer), which
        also prunes what exits we missed left behind."""
        self._adj = {pid: self._adj[pid] for pid in pids if pid in self._adj}
        self._protected = {pid: start for pid, (start, v) in self._adj.items() if v == PROTECTED}
        self.complete = True

    def protected(self) -> list[Key]:
        """(pid, start time) of the known processes last seen at -1000."""
        return list(self._protected.items())

    def get(self, key: Key) -> int | None:
        """The value last seen or written for this process, if it is known."""
        entry = self._adj.get(key[0])
        return entry[1] if entry is not None and entry[0] == key[1] else None

    def __len__(self) -> int:
        return len(self._adj)


__all__ = ["PROTECTED", "AdjBook"]
