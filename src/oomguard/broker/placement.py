"""Where a new run lives: a cgroup of its own, inside whatever limits its
caller had.

On a plain cgroup v2 host a leaf ``oomguard-run-N`` under the caller's
cgroup (runs/lifecycle.py makes it, and refuses a planted one): a mkdir and a
write, done at once. On a systemd host a transient scope in the caller's
slice, asked of systemd over D-Bus, which can take seconds: such a placement
is ``slow``, and the broker runs it off its loop.

A run with a memory budget needs the memory controller in its own cgroup.
A scope gets it from systemd (``MemoryMax=``). On a plain host the caller's
cgroup holds processes, so it cannot enable controllers for children: the
run's cgroup goes beside the caller's instead, and its budget is clamped to
the tightest limit on the caller's way to the root, so the run can never
take more than its caller could.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

from oomguard.host import cgroups, scope
from oomguard.runs import lifecycle
from oomguard.runs.lifecycle import RunRefused
from oomguard.telemetry.reasons import RefusalReason

log = logging.getLogger(__name__)

systemd_scope_argv = scope.scope_argv  # the request names only the peer's pid
SCOPE_ERROR_MAX = 300  # of systemd's words kept on the run


class Placed(NamedTuple):
    """Where the run went: its cgroup, and why systemd refused it a scope
    (None if it got one, or none was asked)."""

    cgroup: str | None
    scope_refused: str | None = None


@dataclass(frozen=True)
class Placement:
    """How one run will be placed; ``place`` does it."""

    run_id: int
    pid: int
    caller_cgroup: str | None
    scope_slice: str | None = None  # set: try a systemd scope in this slice first
    memory_max: int | None = None  # the run's budget, already clamped to the caller's limits

    @property
    def slow(self) -> bool:
        return self.scope_slice is not None

    def place(self) -> Placed:
        """The run's cgroup with the pid moved in (None for a run without
        one), and why systemd refused the scope if it did; RunRefused when a
        leaf cannot be made (planted, or mkdir fails)."""
        if self.caller_cgroup is None:
            return Placed(None)
        refused = None
        if self.scope_slice is not None:
            name = f"{lifecycle.cgroup_name(self.run_id)}.scope"
            refused = scope.start_scope(name, self.pid, self.scope_slice, f"oom-protect run {self.run_id}",
                                        memory_max=self.memory_max)  # fmt: skip
            if refused is None:
                return Placed(cgroups.join(self.caller_cgroup.rsplit("/", 1)[0], name))
            refused = refused[:SCOPE_ERROR_MAX]
            log.warning("run %d: systemd refused its scope (%s); it gets a plain cgroup instead", self.run_id, refused)
        if self.memory_max is None:
            cg = lifecycle.make_cgroup(self.run_id, self.pid, self.caller_cgroup)
            if cg is None and refused is not None:  # neither a scope nor a leaf: no grant
                raise RunRefused(f"systemd refused the run a scope ({refused}), and it could not be moved "
                                 f"into a cgroup of its own under {self.caller_cgroup}", RefusalReason.ERROR)  # fmt: skip
            return Placed(cg, refused)
        parent = self._budget_parent()
        cg = lifecycle.make_cgroup(self.run_id, self.pid, parent, memory_max=self.memory_max)
        if cg is None:
            raise RunRefused(f"the run could not be moved into its budgeted cgroup under {parent}",
                             RefusalReason.ERROR)  # fmt: skip
        return Placed(cg, refused)

    def _budget_parent(self) -> str:
        """Where a budgeted run's cgroup goes: beside the caller's, with the
        memory controller enabled there for it."""
        caller = cgroups.normalize(self.caller_cgroup or "/")
        parent = caller if caller == "/" else caller.rsplit("/", 1)[0] or "/"
        try:
            cgroups.enable_controllers(parent, ["memory"])
        except OSError as e:
            raise RunRefused(f"cannot give the run a memory budget: the memory controller cannot be enabled "
                             f"in {parent}: {e.strerror or e}", RefusalReason.ERROR) from None  # fmt: skip
        return parent


def plan(run_id: int, pid: int, caller_cgroup: str | None, memory_max: int | None = None) -> Placement:
    """Decide the placement from the caller's cgroup, without touching it.
    RunRefused when a budget is asked for and no cgroup can hold it."""
    if caller_cgroup is None or not cgroups.is_v2():
        if memory_max is not None:
            raise RunRefused("a memory budget needs a cgroup v2 host with run cgroups on", RefusalReason.ERROR)
        return Placement(run_id, pid, None)
    if memory_max is not None:
        limit = cgroups.effective_memory_limit(caller_cgroup)
        memory_max = memory_max if limit is None else min(memory_max, limit)
    if cgroups.systemd_booted():
        unit = cgroups.unit_of(caller_cgroup)
        parent = caller_cgroup.rsplit("/", 1)[0] if unit else caller_cgroup
        slice_ = parent.rsplit("/", 1)[-1] or "-.slice"
        # A scope beside the caller's unit would escape limits set on that unit
        # itself; only use one when the unit sets none, or the budget (clamped
        # to them) bounds it.
        if unit and slice_.endswith(".slice") and (memory_max is not None or cgroups.memory_max(caller_cgroup) is None):
            return Placement(run_id, pid, caller_cgroup, scope_slice=slice_, memory_max=memory_max)
    return Placement(run_id, pid, caller_cgroup, memory_max=memory_max)
