"""Classes, protection and inherited grants of processes, walking parents.

The Resolver only reads: the process table (through ``lookup``) and the run
registry. Descendants of protected runs that it finds by walking up are
reported in ``found_descendants`` for the enforcer to hand to the run
lifecycle; a read-only command's resolver thus changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping

from oomguard.config import PolicyClass
from oomguard.host import procfs
from oomguard.policy.matching import matches, self_class
from oomguard.runs.registry import RunRegistry


class Resolver:
    """Classes, protection and inherited grants of processes, parents first,
    memoized by (pid, start time).

    ``lookup(pid)`` returns the live process with that pid (or None). A
    parent only counts if it started no later than the child, so a reused
    pid is never taken for a parent.
    """

    MAX_DEPTH = 256

    def __init__(
        self,
        classes: tuple[PolicyClass, ...],
        lookup: Callable[[int], procfs.Proc | None],
        registry: RunRegistry | None,
        self_pid: int | None = None,
        class_memo: MutableMapping[tuple[int, int], PolicyClass | None] | None = None,
        follow_ancestors: bool = True,
    ):
        self.classes = classes
        self.follow_ancestors = follow_ancestors
        self.lookup = lookup
        self.registry = registry
        self.self_pid = self_pid
        self.self_cls = self_class(classes) if self_pid is not None else None
        self.class_memo: MutableMapping[tuple[int, int], PolicyClass | None] = (
            class_memo if class_memo is not None else {})
        self.protect_memo: dict[tuple[int, int], bool] = {}
        self.origin_memo: dict[tuple[int, int], int | None] = {}
        # child key -> its parent's class, when the parent is known from a
        # fork event but may be gone (and the child reparented) by now
        self.parent_hints: dict[tuple[int, int], PolicyClass | None] = {}
        # (parent, child) where protection was found only by walking up from
        # the child: the enforcer tells the run lifecycle, this never writes.
        self.found_descendants: list[tuple[procfs.Proc, procfs.Proc]] = []
        self._busy: set[tuple[int, int]] = set()

    def parent(self, proc: procfs.Proc) -> procfs.Proc | None:
        if proc.ppid <= 0:
            return None
        p = self.lookup(proc.ppid)
        if p is None or p.starttime > proc.starttime or p.key == proc.key:
            return None
        return p

    def class_of(self, proc: procfs.Proc, depth: int = 0) -> PolicyClass | None:
        key = proc.key
        if key in self.class_memo:
            return self.class_memo[key]
        if proc.pid == self.self_pid and proc.uid == 0 and self.self_cls is not None:
            self.class_memo[key] = self.self_cls
            return self.self_cls
        if key in self._busy or depth > self.MAX_DEPTH:
            return None  # a loop (pid reuse) or an absurdly deep tree
        self._busy.add(key)
        try:
            cached: list[PolicyClass | None] = []

            def parent_class() -> PolicyClass | None:
                if not cached:
                    if key in self.parent_hints:
                        cached.append(self.parent_hints[key])
                    else:
                        par = self.parent(proc)
                        cached.append(self.class_of(par, depth + 1) if par is not None else None)
                return cached[0]

            found = next((c for c in self.classes if matches(c, proc, parent_class)), None)
        finally:
            self._busy.discard(key)
        self.class_memo[key] = found
        return found

    def protected(self, proc: procfs.Proc, depth: int = 0) -> bool:
        """A protected run's process or any live descendant of one."""
        if self.registry is None:
            return False
        key = proc.key
        if key in self.protect_memo:
            return self.protect_memo[key]
        result = self.registry.is_protected(proc.pid, proc.starttime, proc.cgroup)
        if not result and self.follow_ancestors and depth < self.MAX_DEPTH and key not in self._busy:
            par = self.parent(proc)
            self._busy.add(key)
            try:
                if par is not None and self.protected(par, depth + 1):
                    result = True
                    self.found_descendants.append((par, proc))
            finally:
                self._busy.discard(key)
        self.protect_memo[key] = result
        return result

    def inherited_origin(self, proc: procfs.Proc, depth: int = 0) -> int | None:
        """The policy-lowered value ``proc`` inherited, if that is all it has.

        Children copy their parent's oom_score_adj and oom_score_adj_min at
        fork. A cron daemon or sshd that the policy set to -1000 thus hands
        -1000 (and the right to keep it) to every job and session it starts.
        Such a value is ours, not the process's: an unmatched process whose
        negative value equals the one its parent got from a lowering class
        (or inherited the same way) gets the kernel default back."""
        key = proc.key
        if key in self.origin_memo:
            return self.origin_memo[key]
        origin = None
        par = self.parent(proc)
        # init is never written by the policy, so what its children have is
        # systemd's doing (OOMScoreAdjust=), not an inherited grant.
        if par is not None and par.pid != 1 and depth < self.MAX_DEPTH and proc.oom_score_adj < 0:
            pc = self.class_of(par)
            if pc is not None:
                if pc.oom_score_adj < 0:
                    origin = pc.oom_score_adj
            else:
                origin = self.inherited_origin(par, depth + 1)
            if origin is not None and proc.oom_score_adj != origin:
                origin = None
        self.origin_memo[key] = origin
        return origin
