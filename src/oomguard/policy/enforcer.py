"""Keeping the policy in force in the daemon.

rules.py and its siblings say which process gets which oom_score_adj; this
module applies that to processes as they start. The ``Enforcer`` follows the
process events (fork, exec, uid change, exit) in a table indexed by pid, looks
at each new process once its events have settled (``delay``), looks again at
fresh forks a second later, and falls back to polling /proc where there are
no events. On a host without systemd it also moves the app user's processes
into the app cgroup at birth.

Cost, and why it stays flat: an event touches only its own pid's entries; a
process that exits before its look is due costs no /proc read at all (most of
an exec storm); looks are made in batches. All of /proc is walked only at
start, after lost events, on new classes and when asked (``request_resync``)
-- or on a timer where there are no events -- and that walk runs off the
lock, so events never wait behind it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from oomguard.config import Config, PolicyClass
from oomguard.host import cgroups, procfs, users
from oomguard.host.proctable import ProcTable
from oomguard.policy.adjbook import AdjBook
from oomguard.policy.appcgroup import AppPlacement
from oomguard.policy.decisions import PROTECTED, Change, Decision, decide
from oomguard.policy.pending import MISSING, Pending, PendingQueue
from oomguard.policy.resolver import Resolver
from oomguard.policy.rules import classes_for
from oomguard.policy.stats import EnforcerStats
from oomguard.policy.walks import Walks
from oomguard.policy.writes import apply
from oomguard.runs.lifecycle import RunLifecycle
from oomguard.runs.registry import RunRegistry, follows

log = logging.getLogger(__name__)


EVENT_DELAY = 0.05  # the daemon's wait before a look: most of an exec storm has exited by then
SETTLE_SECONDS = 1.0  # a launcher has exited and workers switched uid by then
SETTLE_MAX = 20_000  # beyond that (a fork storm) a resync catches up
PENDING_MAX = 20_000
BATCH = 256  # looks per hold of the lock, so that events get in between
BATCH_GAP = 0.025  # in a storm, one batch per this at most, not one wakeup per process
IDLE_WAKE = 1.0  # nothing queued: the upkeep thread only checks for its stop


class Enforcer(Walks, AppPlacement):
    """Keeps the policy in force for processes that start later.

    Event-driven: the process-event connector thread calls ``handle`` for
    every event. With ``delay`` > 0 and ``run_upkeep`` running, fork, exec
    and uid events queue a look at their process, made ``delay`` later by
    the upkeep thread (one look for all of a process's events, none if it
    exited); otherwise, and through ``on_fork`` / ``on_exec``, each event
    classifies and fixes its process at once. Fallback: ``poll_once`` every
    poll_interval; it looks at new processes (and at those whose comm
    changed, i.e. that exec'd) and re-checks everything every
    ``full_sweep_every`` polls to catch uid changes without exec.

    ``app_cgroup`` / ``app_uid``: on a host without systemd, the app user's
    processes are moved into the app cgroup at birth (``place``).
    """

    def __init__(
        self,
        classes: tuple[PolicyClass, ...],
        registry: RunRegistry | None,
        *,
        app_cgroup: str | None = None,
        app_uid: int | None = None,
        dry_run: bool = False,
        on_change: Callable[[Change], None] | None = None,
        self_pid: int | None = None,
        full_sweep_every: int = 30,
        delay: float = 0.0,
    ):
        self._class_list = classes
        self.registry = registry
        self.app_cgroup = cgroups.normalize(app_cgroup) if app_cgroup else None
        self.app_uid = app_uid
        self.dry_run = dry_run
        self.on_change = on_change
        self.self_pid = os.getpid() if self_pid is None else self_pid
        self.full_sweep_every = max(1, full_sweep_every)
        self.delay = delay
        self.stats = EnforcerStats()
        self._lock = threading.RLock()
        # Classes of processes seen, so that a child's parent class is a dict
        # lookup. Keys are (pid, start time), indexed by pid so that an event
        # touches one pid's entries only; exit events and resyncs prune it.
        self._classes: ProcTable[PolicyClass | None] = ProcTable()
        self._adj = AdjBook()  # their oom_score_adj as last seen or written: status's candidates
        # What polling saw last: pid -> (start time, comm).
        self._seen: dict[int, tuple[int, str]] = {}
        self._pending = PendingQueue(delay, PENDING_MAX)  # first looks
        self._settle = PendingQueue(SETTLE_SECONDS, SETTLE_MAX)  # second looks at forks
        self._wake = threading.Event()  # something was queued or asked for
        self._upkeep_running = False
        self._sleeping_until = 0.0  # when the upkeep thread wakes by itself
        self._resync_wanted = False
        self._walking = threading.Lock()  # one walk of /proc at a time
        self._dirty: set[int] | None = None  # pids events touched during a walk
        self._generation = 0  # bumped by new classes: a walk under old ones is void

    @classmethod
    def from_config(
        cls, config: Config, registry: RunRegistry | None, *, systemd: bool | None = None, **kw: Any
    ) -> Enforcer:
        if systemd is None:
            systemd = cgroups.systemd_booted()
        app_uid = users.uid_of(config.layout.app_user)
        kw.setdefault("delay", EVENT_DELAY)
        return cls(
            classes_for(config),
            registry,
            app_cgroup=None if systemd else config.layout.app_cgroup,
            app_uid=app_uid,
            **kw,
        )

    @property
    def table(self) -> ProcTable[PolicyClass | None]:
        """The live processes' classes, fed by events: (pid, start) -> class.
        Read it under ``lock``; the enforcer alone writes it."""
        return self._classes

    @property
    def adj(self) -> AdjBook:
        """The live processes' oom_score_adj as last seen or written; like ``table``."""
        return self._adj

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    @property
    def classes(self) -> tuple[PolicyClass, ...]:
        return self._class_list

    @classes.setter
    def classes(self, classes: tuple[PolicyClass, ...]) -> None:
        """New classes (a config reload): forget every class learned so far,
        and resync, so that running processes get the new values too."""
        with self._lock:
            self._class_list = classes
            self._classes.clear()
            self._generation += 1
        self.request_resync()

    def request_resync(self) -> None:
        """Walk all of /proc soon: in the upkeep thread, or at the next poll."""
        self._resync_wanted = True
        self._wake.set()

    # ------------------------------------------------------------ one process

    def classify(self, pid: int) -> Decision | None:
        """The decision for one live process, without writing or moving
        anything (for the healer's questions); None if it is gone."""
        proc = procfs.snapshot(pid)
        if proc is None:
            return None
        with self._lock:
            return decide(proc, self._resolver())

    def _resolver(self, procs: dict[int, procfs.Proc] | None = None) -> Resolver:
        # Events reach the registry in order (on_fork tells it about every
        # child), so walking the ancestors for protection is only needed
        # when polling, where forks go unseen.
        def lookup(pid: int) -> procfs.Proc | None:
            return (procs.get(pid) if procs else None) or procfs.snapshot(pid)

        return Resolver(self.classes, lookup, self.registry, self.self_pid, self._classes,
                        follow_ancestors=False)

    def _hint(self, r: Resolver, proc: procfs.Proc, parent: int | None, hint: object = MISSING) -> None:
        """The parent a fork event named: its class counts even if it has
        exited since and the child was reparented (its exit comes after)."""
        if parent is None or proc.ppid == parent:
            return
        if hint is MISSING:
            known = self._classes.latest(parent, upto=proc.starttime)
            if known is None:
                return
            hint = known[1]
        r.parent_hints[proc.key] = hint  # type: ignore[assignment]

    def check(self, pid: int, *, parent_pid: int | None = None) -> Decision | None:
        """Classify one live process, fix its value and place it; the
        decision, or None if it is gone or a kernel thread. ``parent_pid``:
        the parent a fork event named."""
        proc = procfs.snapshot(pid)
        if proc is None:
            return None
        with self._lock:
            self.stats.looks += 1
            r = self._resolver()
            self._hint(r, proc, parent_pid)
            return self._enforce([proc], r)[0]

    def _enforce(self, procs: Sequence[procfs.Proc], r: Resolver) -> list[Decision]:
        """Decide, write in one batch, and place; under the lock."""
        decisions = [decide(p, r) for p in procs]
        self._adj.saw(decisions)
        self._record(apply(decisions, self.dry_run, registry=self.registry))
        if self.app_cgroup:
            for p, d in zip(procs, decisions, strict=True):
                if d.reason != PROTECTED:
                    self._place(p)
        return decisions

    def _record(self, changes: list[Change]) -> None:
        self._adj.wrote(changes)
        for c in changes:
            if c.ok:
                self.stats.writes += 1
                log.info("policy: pid %d (%s) %s %d -> %d", c.pid, c.comm, c.class_name or c.reason,
                         c.old, c.new)
            else:
                self.stats.errors += 1
                log.warning("policy: pid %d (%s) -> %d failed: %s", c.pid, c.comm, c.new, c.error)
            if self.on_change is not None:
                self.on_change(c)

    # ------------------------------------------------------------ events

    def _touched(self, pid: int) -> None:
        if self._dirty is not None:
            self._dirty.add(pid)  # a walk under way must leave this one to the event

    def _tell_registry(self, parent_pid: int, child_pid: int) -> int | None:
        """The registry learns a child at its fork, first, so that a protected
        run's children are never mistaken for ordinary app processes."""
        child_start = procfs.starttime_of(child_pid)
        if self.registry is not None and child_start is not None:
            RunLifecycle(self.registry).member(parent_pid, procfs.starttime_of(parent_pid), child_pid, child_start)
        return child_start

    def _registry_follows(self) -> bool:
        """Whether a fork may make a run member: only runs followed through
        forks have members. None (the common case) means nothing to read."""
        return self.registry is not None and any(follows(r) for r in self.registry.active())

    def on_exec(self, pid: int) -> Decision | None:
        """A process exec'd: its class may have changed with its binary."""
        with self._lock:
            self.stats.events += 1
            self._touched(pid)
            self._classes.forget(pid)
            return self.check(pid)

    def on_fork(self, parent_pid: int, child_pid: int, *_: Any) -> Decision | None:
        """A process forked. The child inherited its parent's value, which is
        wrong when it belongs to another class (a php-fpm master's worker)."""
        with self._lock:
            self.stats.events += 1
            self._touched(child_pid)
            child_start = self._tell_registry(parent_pid, child_pid)
            if child_start is not None:
                self._settle.add(child_pid, time.monotonic(), start=child_start)
            return self.check(child_pid, parent_pid=parent_pid)

    def on_uid(self, pid: int, *_: Any) -> Decision | None:
        """A process changed its uid (cron or sshd becoming the user before
        exec): classes match on uid, so it is looked at like an exec."""
        return self.on_exec(pid)

    def on_exit(self, pid: int, *_: Any) -> None:
        with self._lock:
            self._touched(pid)
            self._classes.forget(pid)
            self._adj.forget(pid)
            self._seen.pop(pid, None)
            if self._pending.drop(pid):
                self.stats.dropped += 1
            self._settle.drop(pid)

    def _queue(self, kind: str, event: tuple) -> None:
        """Remember that a process needs a look ``delay`` from now; nothing
        is read here but, for the registry, the start times at a fork."""
        pid = event[2] if kind == "fork" else event[1]
        with self._lock:
            self.stats.events += 1
            self._touched(pid)
            self._classes.forget(pid)  # an exec or uid change may change its class
            fields: dict[str, Any] = {}
            if kind == "fork":
                parent = event[1]
                if self._registry_follows():
                    self._tell_registry(parent, pid)
                known = self._classes.latest(parent)  # while the parent is still known
                fields = {"parent": parent, "hint": known[1] if known else MISSING, "fork": True}
            now = time.monotonic()
            if not self._pending.add(pid, now, **fields):
                self.request_resync()  # more new processes than we queue: walk them all
            # Wake the upkeep thread only if it sleeps past this look: in a
            # storm it is due to wake anyway, so a process costs no wakeup.
            wake = now + self.delay < self._sleeping_until
        if wake:
            self._wake.set()

    def handle(self, event: tuple) -> None:
        """A procevents tuple: ("fork", parent, child) / ("exec", pid) /
        ("uid", pid, ruid, euid) / ("exit", pid, status) / ("lost",). Lost
        events mean a resync (in the upkeep thread while it runs, so this
        thread goes on draining the socket). Never raises: one bad event
        must not stop the event thread."""
        try:
            kind = event[0]
            if kind == "exit":
                self.on_exit(event[1])
            elif kind == "lost":
                self.stats.lost += 1
                if self._upkeep_running:
                    self.request_resync()
                else:
                    self.resync()
            elif kind in ("exec", "fork", "uid"):
                if self.delay > 0 and self._upkeep_running:
                    self._queue(kind, event)
                elif kind == "fork":
                    self.on_fork(event[1], event[2])
                else:
                    self.on_exec(event[1])
        except Exception:  # noqa: BLE001
            log.exception("policy: event %r", event)

    # ------------------------------------------------------------ upkeep

    def _look(self, batch: list[tuple[int, Pending]], now: float) -> int:
        """One look at each queued process that is still there, all decided
        with one resolver and written in one batch; under the lock."""
        procs: dict[int, procfs.Proc] = {}
        hints: list[tuple[procfs.Proc, Pending]] = []
        for pid, p in batch:
            proc = procfs.snapshot(pid)
            if proc is None or (p.start is not None and proc.starttime != p.start):
                continue  # gone, or (second look) another process by now
            if p.start is not None:
                self._classes.pop(proc.key, None)  # the second look: by who it is now
            if p.fork:
                self._settle.add(pid, now, start=proc.starttime)
            procs[pid] = proc
            hints.append((proc, p))
        if not procs:
            return 0
        r = self._resolver(procs)
        for proc, p in hints:
            self._hint(r, proc, p.parent, p.hint)
        self.stats.looks += len(procs)
        self._enforce(list(procs.values()), r)
        return len(procs)

    def process_due(self, now: float | None = None) -> int:
        """The first looks whose time has come; how many processes were looked at."""
        return self._drain(self._pending, now)

    def settle(self, now: float | None = None) -> int:
        """Look again at processes forked a moment ago, by who they are now.

        A daemonizing service forks its real master from a launcher of the
        same binary, which then exits; at fork time the master looks like a
        worker of the launcher, and its first workers (still root) look like
        masters. A second look once the launcher is gone and the workers
        switched uid sees the true parents. Returns how many were looked at."""
        return self._drain(self._settle, now)

    def _drain(self, queue: PendingQueue, now: float | None) -> int:
        now = time.monotonic() if now is None else now
        n = 0
        while True:
            with self._lock:
                batch = queue.pop_due(now, BATCH)
                if not batch:
                    break
                n += self._look(batch, now)
            if queue.overflowed:
                queue.overflowed = False
                self.request_resync()
        return n

    def _wait(self, now: float, next_resync: float | None) -> float:
        if self._resync_wanted and not self._walking.locked():
            return 0.0
        times = [t for t in (self._pending.next_due(), self._settle.next_due(), next_resync) if t is not None]
        if not times:
            return IDLE_WAKE
        return min(IDLE_WAKE, max(min(times) - now, BATCH_GAP))

    def run_upkeep(self, stop: threading.Event, resync_every: float | None = None) -> None:
        """In event mode: the delayed looks, the second looks at settled
        forks, and a resync when one is due: after lost events, on new
        classes, or when asked. No timer walks /proc unless ``resync_every``
        asks for one; an idle enforcer wakes once per ``IDLE_WAKE``."""
        self._upkeep_running = True
        next_resync = time.monotonic() + resync_every if resync_every else None
        try:
            while not stop.is_set():
                self._wake.clear()
                now = time.monotonic()
                with self._lock:
                    wait = self._wait(now, next_resync)
                    self._sleeping_until = now + wait
                if wait > 0 and self._wake.wait(wait):
                    continue  # something new was queued: work out the wait again
                if stop.is_set():
                    break
                now = time.monotonic()
                self.process_due(now)
                self.settle(now)
                if next_resync is not None and now >= next_resync:
                    self._resync_wanted = True
                    next_resync = now + (resync_every or 0)
                if self._resync_wanted and not self._walking.locked():
                    self._resync_wanted = False  # a request during the walk makes another
                    threading.Thread(target=self._walk_apart, name="policy-walk", daemon=True).start()
        finally:
            self._upkeep_running = False

    def _walk_apart(self) -> None:
        """A resync in a thread of its own: the delayed looks go on meanwhile
        (a walk of 10,000 processes takes seconds)."""
        try:
            self.resync()
        except Exception:  # noqa: BLE001 - the next loss or request tries again
            log.exception("policy: resync")
        finally:
            self._wake.set()  # a request made during the walk is seen now

    def resync(self) -> list[Change]:
        """A walk of all of /proc: at start (it also learns every live
        process's class, which fork events of parents that exit quickly
        need), after lost events, on new classes and when asked."""
        return self.poll_once(full=True)


__all__ = ["EVENT_DELAY", "SETTLE_MAX", "SETTLE_SECONDS", "Enforcer", "EnforcerStats"]
