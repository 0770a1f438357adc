"""Keeping the policy in force in the daemon.

rules.py and its siblings say which process gets which oom_score_adj; this module applies
that to processes as they start. The ``Enforcer`` classifies and fixes one
process per process event (fork, exec, uid change), looks again at fresh
forks once they settled, and falls back to polling /proc where there are no
events. On a host without systemd it also moves the app user's processes
into the app cgroup at birth.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from oomguard.config import Config, PolicyClass
from oomguard.host import cgroups, procfs, users
from oomguard.host.proctable import ProcTable
from oomguard.policy.decisions import PROTECTED, Change, Decision, decide
from oomguard.policy.resolver import Resolver
from oomguard.policy.rules import classes_for
from oomguard.policy.writes import apply
from oomguard.runs.lifecycle import RunLifecycle
from oomguard.runs.registry import RunRegistry

log = logging.getLogger(__name__)


SETTLE_SECONDS = 1.0  # a launcher has exited and workers switched uid by then
SETTLE_MAX = 20_000  # beyond that (a fork storm) the periodic resync catches up


@dataclass
class EnforcerStats:
    events: int = 0
    polls: int = 0
    writes: int = 0
    errors: int = 0
    placed: int = 0
    place_errors: int = 0


class Enforcer:
    """Keeps the policy in force for processes that start later.

    Event-driven: the process-event connector thread calls ``handle`` (or
    ``on_fork`` / ``on_exec`` / ``on_exit``) for every event; each call
    classifies and fixes one process. Fallback: ``poll_once`` every
    poll_interval; it looks at new processes (and at those whose comm changed,
    i.e. that exec'd) and re-checks everything every ``full_sweep_every``
    polls to catch uid changes without exec.

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
    ):
        self._class_list = classes
        self.registry = registry
        self.app_cgroup = cgroups.normalize(app_cgroup) if app_cgroup else None
        self.app_uid = app_uid
        self.dry_run = dry_run
        self.on_change = on_change
        self.self_pid = os.getpid() if self_pid is None else self_pid
        self.full_sweep_every = max(1, full_sweep_every)
        self.stats = EnforcerStats()
        self._lock = threading.RLock()
        # Classes of processes seen, so that a child's parent class is a dict
        # lookup. Keys are (pid, start time), indexed by pid so that an event
        # touches one pid's entries only; exit events and sweeps prune it.
        self._classes: ProcTable[PolicyClass | None] = ProcTable()
        # What polling saw last: pid -> (start time, comm).
        self._seen: dict[int, tuple[int, str]] = {}
        # Forks to look at again once they settled: (due, pid, start time).
        self._settle: deque[tuple[float, int, int]] = deque(maxlen=SETTLE_MAX)

    @classmethod
    def from_config(
        cls, config: Config, registry: RunRegistry | None, *, systemd: bool | None = None, **kw: Any
    ) -> Enforcer:
        if systemd is None:
            systemd = cgroups.systemd_booted()
        app_uid = users.uid_of(config.layout.app_user)
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
    def lock(self) -> threading.RLock:
        return self._lock

    @property
    def classes(self) -> tuple[PolicyClass, ...]:
        return self._class_list

    @classes.setter
    def classes(self, classes: tuple[PolicyClass, ...]) -> None:
        """New classes (a config reload): forget every class learned so far."""
        with self._lock:
            self._class_list = classes
            self._classes.clear()

    # ------------------------------------------------------------ one process

    def classify(self, pid: int) -> Decision | None:
        """The decision for one live process, without writing or moving
        anything (for the healer's questions); None if it is gone."""
        proc = procfs.snapshot(pid)
        if proc is None:
            return None
        with self._lock:
            return decide(proc, self._resolver())

    def _lookup(self, pid: int) -> procfs.Proc | None:
        return procfs.snapshot(pid)

    def _resolver(self) -> Resolver:
        # Events reach the registry in order (on_fork tells it about every
        # child), so walking the ancestors for protection is only needed
        # when polling, where forks go unseen.
        return Resolver(self.classes, self._lookup, self.registry, self.self_pid, self._classes,
                         follow_ancestors=False)

    def check(self, pid: int, *, parent_pid: int | None = None) -> Decision | None:
        """Classify one live process, fix its value and place it; the
        decision, or None if it is gone or a kernel thread. ``parent_pid``:
        the parent a fork event named, whose class is used even if it has
        exited since (its exit event comes after the fork event)."""
        proc = procfs.snapshot(pid)
        if proc is None:
            return None
        with self._lock:
            r = self._resolver()
            if parent_pid is not None and proc.ppid != parent_pid:
                known = self._classes.latest(parent_pid, upto=proc.starttime)
                if known is not None:
                    r.parent_hints[proc.key] = known[1]
            d = decide(proc, r)
            self._record(apply([d], self.dry_run, registry=self.registry))
            if self.app_cgroup and d.reason != PROTECTED:
                self._place(proc)
            return d

    def _record(self, changes: list[Change]) -> None:
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

    def on_exec(self, pid: int) -> Decision | None:
        """A process exec'd: its class may have changed with its binary."""
        with self._lock:
            self.stats.events += 1
            self._classes.forget(pid)
            return self.check(pid)

    def on_fork(self, parent_pid: int, child_pid: int, *_: Any) -> Decision | None:
        """A process forked. The child inherited its parent's value, which is
        wrong when it belongs to another class (a php-fpm master's worker).
        The registry learns the child first, so a protected run's children
        are never mistaken for ordinary app processes."""
        with self._lock:
            self.stats.events += 1
            child_start = procfs.starttime_of(child_pid)
            if self.registry is not None:
                RunLifecycle(self.registry).member(parent_pid, procfs.starttime_of(parent_pid), child_pid, child_start)
            if child_start is not None:
                self._settle.append((time.monotonic() + SETTLE_SECONDS, child_pid, child_start))
            return self.check(child_pid, parent_pid=parent_pid)

    def settle(self, now: float | None = None) -> int:
        """Look again at processes forked a moment ago, by who they are now.

        A daemonizing service forks its real master from a launcher of the
        same binary, which then exits; at fork time the master looks like a
        worker of the launcher, and its first workers (still root) look like
        masters. A second look once the launcher is gone and the workers
        switched uid sees the true parents. Returns how many were looked at."""
        now = time.monotonic() if now is None else now
        n = 0
        with self._lock:
            while self._settle and self._settle[0][0] <= now:
                _, pid, start = self._settle.popleft()
                if procfs.starttime_of(pid) != start:
                    continue
                self._classes.pop((pid, start), None)
                self.check(pid)
                n += 1
        return n

    def run_upkeep(self, stop: threading.Event, resync_every: float = 60.0) -> None:
        """In event mode: settle recent forks, and a full resync now and then
        (a process whose uid changed without an event, a parent that changed
        class without its children noticing)."""
        next_resync = time.monotonic() + resync_every
        while not stop.wait(0.25):
            self.settle()
            if time.monotonic() >= next_resync:
                self.resync()
                next_resync = time.monotonic() + resync_every

    def on_exit(self, pid: int, *_: Any) -> None:
        with self._lock:
            self._classes.forget(pid)
            self._seen.pop(pid, None)

    def on_uid(self, pid: int, *_: Any) -> Decision | None:
        """A process changed its uid (cron or sshd becoming the user before
        exec): classes match on uid, so it is looked at like an exec."""
        return self.on_exec(pid)

    def resync(self) -> list[Change]:
        """A full round: at start (it also learns every live process's class,
        which fork events of parents that exit quickly need) and after lost
        events."""
        return self.poll_once(full=True)

    def handle(self, event: tuple) -> None:
        """A procevents tuple: ("fork", parent, child) / ("exec", pid) /
        ("uid", pid, ruid, euid) / ("exit", pid, status) / ("lost",). Lost
        events mean a full polling round. Never raises: one bad event must
        not stop the event thread."""
        try:
            kind = event[0]
            if kind == "exec":
                self.on_exec(event[1])
            elif kind == "fork":
                self.on_fork(event[1], event[2])
            elif kind == "uid":
                self.on_uid(event[1])
            elif kind == "exit":
                self.on_exit(event[1])
            elif kind == "lost":
                self.resync()
        except Exception:  # noqa: BLE001
            log.exception("policy: event %r", event)

    # ------------------------------------------------------------ placement

    def place(self, pid: int) -> bool:
        """Move an app-user process into the app cgroup; True if moved.

        Only at birth does this keep the books right: memory a process has
        already been charged stays charged to the cgroup it came from (cgroup
        v2 does not move charges), so a process that grew elsewhere keeps
        that memory outside the app limit until it frees it."""
        proc = procfs.snapshot(pid)
        if proc is None:
            return False
        with self._lock:
            if self.registry is not None and self._resolver().protected(proc):
                return False
            return self._place(proc)

    def _place(self, proc: procfs.Proc) -> bool:
        target = self.app_cgroup
        if target is None or self.app_uid is None or proc.uid != self.app_uid:
            return False
        cg = proc.cgroup or "/"
        if cg == target or cg.startswith(target + "/"):
            return False
        if self.dry_run:
            return True
        try:
            cgroups.move(proc.pid, target)
        except (*procfs.GONE, ProcessLookupError):
            return False
        except OSError as e:
            if e.errno == errno.ESRCH:
                return False
            self.stats.place_errors += 1
            log.warning("policy: cannot move pid %d into %s: %s", proc.pid, target, e)
            return False
        self.stats.placed += 1
        return True

    # ------------------------------------------------------------ polling

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
        """One polling round; returns the writes made (or failed)."""
        with self._lock:
            self.stats.polls += 1
            if full is None:
                full = self.stats.polls % self.full_sweep_every == 1 or not self._seen
            now = self._stat_all()
            if full:
                todo = list(now)
                self._classes.clear()  # also forgets classes from before an unseen exec
            else:
                todo = [pid for pid, v in now.items() if self._seen.get(pid) != v]
                for pid, v in now.items():
                    old = self._seen.get(pid)
                    if old is not None and old[0] == v[0] and old[1] != v[1]:
                        self._classes.pop((pid, v[0]), None)  # exec'd: class may differ
            self._seen = now
            procs = {}
            for pid in todo:
                p = procfs.snapshot(pid)
                if p is not None:
                    procs[pid] = p

            def lookup(pid: int) -> procfs.Proc | None:
                return procs.get(pid) or procfs.snapshot(pid)

            r = Resolver(self.classes, lookup, self.registry, self.self_pid, self._classes)
            decisions = [decide(p, r) for p in procs.values()]
            if self.registry is not None and not self.registry.read_only:
                # Polling sees no forks: follow what the walk up found from now on,
                # even after the parent exits.
                runs = RunLifecycle(self.registry)
                for par, child in r.found_descendants:
                    runs.member(par.pid, par.starttime, child.pid, child.starttime)
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


__all__ = ["SETTLE_MAX", "SETTLE_SECONDS", "Enforcer", "EnforcerStats"]
