"""Runs the registry lost, found again before the broker serves.

runs.json can be lost or rolled back (a restore, a disk error, a crash
between a grant and its flush), while what it recorded lives on. The kernel
still holds the truth, and a restarted daemon reads it back:

- a populated, root-owned ``oomguard-run-N`` cgroup (or its ``.scope``) that
  no active run names, outside any cgroup a user owns (so never one a user
  planted), is run N again, its oldest process its first;
- a -1000 process that belongs to no run, whose parent is not one too, is the
  first process of a run without a cgroup, and its -1000 descendants are
  followed as its members. Only processes that ``claimable`` accepts: the
  healer's own rule for what it may end (a login or allowed user's, not
  exempt by policy, not the system's database).

Adopted runs say so (``extra["adopted"]``), get a grant event like any other
and end like any other.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

from oomguard.host import cgroups, cmdline, procfs, users
from oomguard.runs.lifecycle import RunLifecycle
from oomguard.runs.run import Run

log = logging.getLogger(__name__)

RUN_CGROUP = re.compile(r"oomguard-run-(\d+)(?:\.scope)?")
PROTECTED = -1000
ADOPTED = "adopted"  # Run.extra: how a lost run was found again ("cgroup" or "oom_score_adj")


def _started(proc: procfs.Proc) -> float:
    """Wall time of a process's start, from its start time in clock ticks."""
    return procfs.boot_time() + proc.starttime / procfs.CLK_TCK


def _run_of(run_id: int, first: procfs.Proc, cgroup: str | None, how: str) -> Run:
    return Run(
        id=run_id,
        uid=first.uid,
        user=users.name_of(first.uid) or str(first.uid),
        pid=first.pid,
        starttime=first.starttime,
        started=_started(first),
        command=cmdline.read_cmdline_bounded(first.pid, timeout=0.2, limit=512) or first.comm,
        cgroup=cgroup,
        extra={ADOPTED: how},
    )


class Adoption:
    def __init__(self, lifecycle: RunLifecycle, claimable: Callable[[procfs.Proc], bool]):
        self.lifecycle = lifecycle
        self.registry = lifecycle.registry
        self.claimable = claimable

    def adopt(self, processes: Iterable[procfs.Proc] | None = None) -> list[Run]:
        """Every live run the registry does not know, recorded again."""
        procs = [p for p in (procfs.iter_processes() if processes is None else processes) if p.state != "Z"]
        found = self._by_cgroup(procs)
        found += self._by_oom_score_adj(procs)
        for run in found:
            log.warning("run %d of %s (pid %d, %s) was not in the registry: adopted by its %s",
                        run.id, run.user, run.pid, run.cgroup or "no cgroup", run.extra[ADOPTED])  # fmt: skip
        return found

    def _by_cgroup(self, procs: list[procfs.Proc]) -> list[Run]:
        known = {cgroups.normalize(r.cgroup) for r in self.registry.active() if r.cgroup}
        inside: dict[str, list[procfs.Proc]] = {}
        for p in procs:
            if p.cgroup:
                for cg in cgroups.lineage(p.cgroup):
                    if RUN_CGROUP.fullmatch(cg.rsplit("/", 1)[-1]):
                        inside.setdefault(cg, []).append(p)
                        break
        adopted = []
        for cg, members in sorted(inside.items()):
            run_id = int(RUN_CGROUP.fullmatch(cg.rsplit("/", 1)[-1]).group(1))  # type: ignore[union-attr]
            if cg in known or not self._root_made(cg):
                continue
            if not self.registry.claim_id(run_id):
                log.warning("cgroup %s: run %d is another run in the registry; not adopted", cg, run_id)
                continue
            run = _run_of(run_id, min(members, key=lambda p: p.starttime), cg, "cgroup")
            adopted.append(self.lifecycle.begin(run))
        return adopted

    @staticmethod
    def _root_made(cg: str) -> bool:
        """Made by us (or systemd for us): root's, never inside a user's subtree."""
        return cgroups.owner(cg) == 0 and not cgroups.under_a_user_owned(cg)

    def _by_oom_score_adj(self, procs: list[procfs.Proc]) -> list[Run]:
        loose = {p.pid: p for p in procs if p.oom_score_adj == PROTECTED and p.uid != 0
                 and self.registry.run_of(p.pid, p.starttime, p.cgroup) is None and self.claimable(p)}  # fmt: skip
        adopted = []
        for p in sorted(loose.values(), key=lambda p: p.starttime):
            parent = loose.get(p.ppid)
            if parent is not None and parent.uid == p.uid:
                continue  # a member of its parent's run
            run = self.lifecycle.begin(_run_of(self.registry.new_id(), p, None, "oom_score_adj"))
            for member in _descendants(p, loose):
                self.registry.add_member(member.key, run.id)
            adopted.append(run)
        return adopted


def _descendants(root: procfs.Proc, loose: dict[int, procfs.Proc]) -> list[procfs.Proc]:
    children: dict[int, list[procfs.Proc]] = {}
    for p in loose.values():
        children.setdefault(p.ppid, []).append(p)
    out, todo = [], [root.pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child.uid == root.uid and child.pid != root.pid:
                out.append(child)
                todo.append(child.pid)
    return out
