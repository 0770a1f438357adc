"""Where a new run lives: a cgroup of its own, inside whatever limits its
caller had.

On a plain cgroup v2 host a leaf ``oomguard-run-N`` under the caller's
cgroup (runs/lifecycle.py makes it, and refuses a planted one): a mkdir and a
write, done at once. On a systemd host a transient scope in the caller's
slice, asked of systemd over D-Bus, which can take seconds: such a placement
is ``slow``, and the broker runs it off its loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from oomguard.host import cgroups, scope
from oomguard.runs import lifecycle

log = logging.getLogger(__name__)

systemd_scope_argv = scope.scope_argv  # the request names only the peer's pid


@dataclass(frozen=True)
class Placement:
    """How one run will be placed; ``place`` does it."""

    run_id: int
    pid: int
    caller_cgroup: str | None
    scope_slice: str | None = None  # set: try a systemd scope in this slice first

    @property
    def slow(self) -> bool:
        return self.scope_slice is not None

    def place(self) -> str | None:
        """The run's cgroup with the pid moved in, or None for a run without
        one; RunRefused when a leaf cannot be made (planted, or mkdir fails)."""
        if self.caller_cgroup is None:
            return None
        if self.scope_slice is not None:
            name = f"{lifecycle.cgroup_name(self.run_id)}.scope"
            why = scope.start_scope(name, self.pid, self.scope_slice, f"oom-protect run {self.run_id}")
            if why is None:
                return cgroups.join(self.caller_cgroup.rsplit("/", 1)[0], name)
            log.warning("run %d: systemd scope failed: %s", self.run_id, why)
        return lifecycle.make_cgroup(self.run_id, self.pid, self.caller_cgroup)


def plan(run_id: int, pid: int, caller_cgroup: str | None) -> Placement:
    """Decide the placement from the caller's cgroup, without touching it."""
    if caller_cgroup is None or not cgroups.is_v2():
        return Placement(run_id, pid, None)
    if cgroups.systemd_booted():
        unit = cgroups.unit_of(caller_cgroup)
        parent = caller_cgroup.rsplit("/", 1)[0] if unit else caller_cgroup
        slice_ = parent.rsplit("/", 1)[-1] or "-.slice"
        # A scope beside the caller's unit would escape limits set on that unit
        # itself; only use one when the unit sets none.
        if unit and slice_.endswith(".slice") and cgroups.memory_max(caller_cgroup) is None:
            return Placement(run_id, pid, caller_cgroup, scope_slice=slice_)
    return Placement(run_id, pid, caller_cgroup)
