"""Walks of all of /proc, a part of the ``Enforcer``: polling mode's rounds
(where there are no process events) and the resync (at start, after lost
events, on new classes, when asked).

A full walk reads /proc and decides off the enforcer's lock, so that events
are handled while it runs (10,000 processes take about a second); only the
writes, and the merge of what it learned, hold the lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from oomguard.config import PolicyClass
from oomguard.host import procfs
from oomguard.host.proctable import ProcTable
from oomguard.policy.adjbook import AdjBook
from oomguard.policy.decisions import PROTECTED, Change, Decision, decide
from oomguard.policy.resolver import Resolver
from oomguard.policy.stats import EnforcerStats
from oomguard.policy.writes import apply
from oomguard.runs.lifecycle import RunLifecycle
from oomguard.runs.registry import RunRegistry

log = logging.getLogger("oomguard.policy.enforcer")  # one logger for the enforcer's parts


class Walks:
    """The walking half of the Enforcer; the attributes are the Enforcer's."""

    _lock: threading.RLock
    _walking: threading.Lock
    _classes: ProcTable[PolicyClass | None]
    _adj: AdjBook
    _seen: dict[int, tuple[int, str]]
    _dirty: set[int] | None
    _generation: int
    _resync_wanted: bool
    registry: RunRegistry | None
    self_pid: int
    dry_run: bool
    app_cgroup: str | None
    full_sweep_every: int
    stats: EnforcerStats
    classes: tuple[PolicyClass, ...]
    _record: Callable[[list[Change]], None]
    _place: Callable[[procfs.Proc], bool]

    def _stat_all(self) -> dict[int, tuple[int, str]]:
        out: dict[int, tuple[int, str]] = {}
        for pid in procfs.list_pids():
            try:
                st = procfs.read_stat(pid)
            except (*procfs.GONE, PermissionError, ValueError, IndexError):
                continue
            out[pid] = (st.starttime, st.comm)
        return out

    def poll_once(self, *, full: bool | None = None) -> list[Change]:
        """One polling round; returns the writes made (or failed). A full
        round is a walk of all of /proc (``_walk``)."""
        with self._lock:
            self.stats.polls += 1
            if full is None:
                full = self.stats.polls % self.full_sweep_every == 1 or not self._seen or self._resync_wanted
            if full:
                self._resync_wanted = False
        if full:
            return self._walk()
        with self._lock:
            now = self._stat_all()
            todo = [pid for pid, v in now.items() if self._seen.get(pid) != v]
            for pid, v in now.items():
                old = self._seen.get(pid)
                if old is not None and old[0] == v[0] and old[1] != v[1]:
                    self._classes.pop((pid, v[0]), None)  # exec'd: class may differ
            self._seen = now
            procs = {pid: p for pid in todo if (p := procfs.snapshot(pid)) is not None}
            r = Resolver(self.classes, lambda pid: procs.get(pid) or procfs.snapshot(pid), self.registry,
                         self.self_pid, self._classes)
            return self._apply_round(procs, [decide(p, r) for p in procs.values()], r)

    def _walk(self) -> list[Change]:
        """Every live process, decided afresh (which also forgets classes
        from before an unseen exec). /proc is read and the decisions made
        off the lock, so events are handled meanwhile; under it, what events
        touched during the walk is left to them (their look is newer), and
        each write checks the start time."""
        with self._walking:
            with self._lock:
                self.stats.resyncs += 1
                self._dirty = set()
                generation, classes = self._generation, self.classes
            try:
                seen = self._stat_all()
                procs = {pid: p for pid in seen if (p := procfs.snapshot(pid)) is not None}
                memo: dict[tuple[int, int], PolicyClass | None] = {}
                r = Resolver(classes, lambda pid: procs.get(pid) or procfs.snapshot(pid), self.registry,
                             self.self_pid, memo)
                decisions = [decide(p, r) for p in procs.values()]
            finally:
                with self._lock:
                    dirty, self._dirty = self._dirty or set(), None
            with self._lock:
                if generation != self._generation:
                    return []  # new classes meanwhile: they asked for a walk of their own
                fresh: ProcTable[PolicyClass | None] = ProcTable()
                for key, cls in memo.items():
                    if key[0] not in dirty:
                        fresh[key] = cls
                for pid in dirty:
                    for start, cls in self._classes.entries(pid).items():
                        fresh[(pid, start)] = cls
                self._classes.replace(fresh)  # also prunes what exits we missed left
                self._adj.keep_only(dirty)  # _apply_round notes what the walk saw
                self._seen = seen
                keep = {pid: p for pid, p in procs.items() if pid not in dirty}
                return self._apply_round(keep, [d for d in decisions if d.pid not in dirty], r)

    def _apply_round(self, procs: dict[int, procfs.Proc], decisions: list[Decision], r: Resolver) -> list[Change]:
        """A polling round's or a walk's writes and moves; under the lock."""
        if self.registry is not None and not self.registry.read_only:
            # Polling sees no forks: follow what the walk up found from now on,
            # even after the parent exits.
            runs = RunLifecycle(self.registry)
            for par, child in r.found_descendants:
                runs.member(par.pid, par.starttime, child.pid, child.starttime)
        self._adj.saw(decisions)
        changes = apply(decisions, self.dry_run, registry=self.registry)
        self._record(changes)
        if self.app_cgroup:
            for d in decisions:
                if d.reason != PROTECTED:
                    self._place(procs[d.pid])
        return changes

    def run_polling(self, stop: threading.Event, interval: float) -> None:
        """Poll until ``stop`` is set (the daemon's fallback loop)."""
        while not stop.is_set():
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the loop must survive
                log.exception("policy: poll")
            stop.wait(interval)


__all__ = ["Walks"]
