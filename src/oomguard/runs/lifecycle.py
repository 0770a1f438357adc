"""A run's life, with one owner: begin, member, end, reap.

Only this module creates and removes a run's cgroup and writes a run's end
(``ended``, ``end_reason``, ``exit_status``), each once. The broker admits
and begins runs, the process-event thread reports forks and exits, the
healer claims the end of a run it is killing and ends it when nothing is
left, and the reaper ends what emptied by itself. All of them come here, so
two of them can no longer race each other over one run's cgroup or end.

The state lives in the registry (runs.registry); a ``RunLifecycle`` is a
cheap handle on it, so each caller may hold its own.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import replace

from oomguard.host import cgroups
from oomguard.runs.registry import RunRegistry
from oomguard.runs.run import FOLLOW, Run, decode_wait_status
from oomguard.telemetry.reasons import RefusalReason

log = logging.getLogger(__name__)

EXITED = "exited"  # end_reason of a run whose processes all went by themselves
WHILE_DOWN = "ended while the daemon was down"  # its exit status is lost with the exit event


class RunRefused(Exception):
    """A run that must not begin; ``reason`` is the refusal's metric label."""

    def __init__(self, message: str, reason: RefusalReason):
        super().__init__(message)
        self.reason = reason


def cgroup_name(run_id: int) -> str:
    return f"oomguard-run-{run_id}"


def owns_cgroup(run: Run) -> bool:
    """Whether the run's cgroup was made for it (by us, or as its systemd
    scope), and so is the run's to remove: never a cgroup it merely sits in."""
    if not run.cgroup:
        return False
    leaf = run.cgroup.rstrip("/").rsplit("/", 1)[-1]
    return leaf in (cgroup_name(run.id), cgroup_name(run.id) + ".scope")


def make_cgroup(run_id: int, pid: int, parent: str, memory_max: int | None = None) -> str | None:
    """A new cgroup for the run under ``parent``, with ``pid`` moved into it;
    with ``memory_max``, that budget (and no swap) is set before the move.

    An existing directory of that name is refused, never adopted: in a
    cgroup delegated to the user it may have been planted, with limits or
    processes of the user's choosing (an empty root-made one that a crash
    left is removed and made again). A failing mkdir is refused too, so
    that ``cgroup.max.descendants=0`` cannot buy a run without a cgroup.
    If only the move fails, the run goes on without a cgroup, as before."""
    cg = cgroups.join(parent, cgroup_name(run_id))
    try:
        try:
            cgroups.create(cg, exist_ok=False)
        except FileExistsError:
            if not _crash_leftover(cg):
                raise
            log.warning("run %d: removing %s, left empty by a daemon killed mid-grant", run_id, cg)
            _remove(cg)
            cgroups.create(cg, exist_ok=False)
    except FileExistsError:
        log.warning("run %d: %s already exists; refusing to adopt it", run_id, cg)
        raise RunRefused(f"the run's cgroup {cg} already exists", RefusalReason.ERROR) from None
    except OSError as e:
        log.warning("run %d: cannot create %s: %s", run_id, cg, e)
        raise RunRefused(f"cannot create the run's cgroup under {parent}: {e.strerror or e}",
                         RefusalReason.ERROR) from None
    if memory_max is not None:
        try:
            cgroups.set_memory_budget(cg, memory_max)
        except OSError as e:
            _remove(cg)
            raise RunRefused(f"cannot set the run's memory budget in {cg}: {e.strerror or e}",
                             RefusalReason.ERROR) from None  # fmt: skip
    try:
        cgroups.move(pid, cg)
    except OSError as e:
        log.warning("run %d: no cgroup of its own under %s: %s", run_id, parent, e)
        _remove(cg)
        return None
    return cg


def _crash_leftover(cg: str) -> bool:
    """An existing leaf for a run id nobody holds is ours only if root made
    it outside any user's subtree and nothing is in it: a grant cut short
    between the mkdir and the registry's write (the id was never saved, so
    the next daemon hands it out again). Anything else may be planted."""
    return cgroups.owner(cg) == 0 and not cgroups.under_a_user_owned(cg) and not cgroups.populated(cg) \
        and not cgroups.children(cg)


def _remove(cgroup: str) -> bool:
    """rmdir, tolerating a cgroup that is already gone; False if it stays."""
    try:
        return cgroups.remove(cgroup)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.warning("cannot remove cgroup %s: %s", cgroup, e)
        return e.errno == errno.ENOENT


class RunLifecycle:
    """Begin, member, end and reap: every change to a run's life."""

    def __init__(self, registry: RunRegistry):
        self.registry = registry

    # ------------------------------------------------------------ begin

    def admit(self, uid: int, pid: int, starttime: int, cgroup: str | None, max_active: int) -> Run | None:
        """Before a grant. The active run the process already belongs to (its
        first process asking twice, or a process inside it), which is the
        answer instead of a second run nested in the first; None for a new
        run. RunRefused for a process inside another user's run, and for an
        owner already at ``max_active`` active runs."""
        with self.registry.lock:
            run = self.registry.run_of(pid, starttime, cgroup)
            if run is not None:
                if run.uid == uid:
                    return run
                raise RunRefused(
                    f"pid {pid} is inside protected run {run.id} of another user",
                    RefusalReason.NESTED,
                )
            if self.registry.active_count(uid) >= max_active:
                raise RunRefused(
                    f"uid {uid} already has {max_active} active protected runs (see [protect] max_runs_per_uid)",
                    RefusalReason.LIMIT,
                )
        return None

    def begin(self, run: Run) -> Run:
        """Record a granted run (before its -1000 is written). A cgroup inside
        one its user owns (delegated, as user@UID.service is) does not hold
        the run: the user may move its processes to a sibling, so the run is
        followed through fork events too, and never ends while they live."""
        if run.cgroup and cgroups.under_a_user_owned(run.cgroup):
            run = replace(run, extra={**run.extra, FOLLOW: True})
        self.registry.add(run)
        return run

    def abandon(self, run: Run) -> None:
        """A grant that did not go through: forget the run, remove its cgroup."""
        self.registry.discard(run.id)
        if owns_cgroup(run):
            _remove(run.cgroup)  # type: ignore[arg-type]

    # ------------------------------------------------------------ while it runs

    def member(self, parent_pid: int, parent_start: int | None, child_pid: int, child_start: int | None) -> None:
        """A fork: a child of a cgroup-less run's process joins the run."""
        self.registry.on_fork(parent_pid, parent_start, child_pid, child_start)

    def exited(self, pid: int, wait_status: int) -> Run | None:
        """The run's first process exited: its status is the run's, set once."""
        with self.registry.lock:
            run = self.registry.by_pid(pid)
            if run is None or run.exit_status is not None:
                self.registry.forget_member(pid)
                return None
            return self.registry.update(run.id, exit_status=decode_wait_status(wait_status))

    def claim_end(self, run_id: int, reason: str) -> bool:
        """A killer is about to signal the run: its reason is what the end
        records, whoever sees the run go first. False if another claim (or
        the end) came first."""
        with self.registry.lock:
            run = self.registry.get(run_id)
            if run is None or not run.active or run.end_reason is not None:
                return False
            self.registry.update(run_id, end_reason=reason)
            return True

    def withdraw_claim(self, run_id: int, reason: str) -> None:
        """The kill left part of the run alive: the run goes on unclaimed."""
        with self.registry.lock:
            run = self.registry.get(run_id)
            if run is not None and run.active and run.end_reason == reason:
                self.registry.update(run_id, end_reason=None)

    # ------------------------------------------------------------ end

    def end(self, run_id: int, reason: str | None = None, peak_memory: int | None = None) -> Run | None:
        """Nothing of the run is left: read its peak, remove its cgroup and
        set its end, once. The reaper's next ``reap`` hands it on (run_end).
        None if it had ended already."""
        run = self.registry.get(run_id)
        if run is None or not run.active:
            return None
        if owns_cgroup(run):  # never a cgroup the run only sat in (the app's)
            if peak_memory is None:
                peak_memory = cgroups.memory_peak(run.cgroup)  # type: ignore[arg-type]
            _remove(run.cgroup)  # type: ignore[arg-type]
        return self.registry.finish(
            run_id,
            ended=time.time(),
            peak_memory=peak_memory if peak_memory is not None else run.peak_memory,
            end_reason=run.end_reason or reason or EXITED,
        )

    def reap(self, *, at_start: bool = False) -> list[Run]:
        """End the runs of which nothing is left, and forget old ended runs;
        the runs that ended since the last call (here or by ``end``). At the
        daemon's start, a run found gone with no exit seen ended while no
        daemon watched, and says so."""
        for run in self.registry.active():
            if not self.registry.alive(run):
                lost = at_start and run.exit_status is None and run.end_reason is None
                self.end(run.id, WHILE_DOWN if lost else None)
        ended = self.registry.take_ended()
        self.registry.forget_ended()
        return ended
