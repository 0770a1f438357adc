"""A protected run: one grant, as the registry keeps it.

A run is the process that asked, identified by (pid, start time), plus the
cgroup the broker made for it. A Run is a value: it is replaced, never
changed, so readers may hold one without a lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Run:
    id: int
    uid: int
    user: str
    pid: int
    starttime: int  # clock ticks after boot, field 22 of /proc/<pid>/stat
    started: float  # wall clock, for people
    command: str  # as the kernel showed it, truncated
    cgroup: str | None  # the run's own cgroup, None if one could not be made
    tty: str | None = None  # controlling terminal, to tell the owner why a run was stopped
    ended: float | None = None
    exit_status: int | None = None  # exit code, or -N for death by signal N
    peak_memory: int | None = None
    end_reason: str | None = None  # "exited", "killed by healer", "boot", ...
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.starttime)

    @property
    def active(self) -> bool:
        return self.ended is None


def decode_wait_status(status: int) -> int:
    """A wait(2) status as a shell shows it: exit code, or -signal."""
    if status & 0x7F == 0:
        return (status >> 8) & 0xFF
    return -(status & 0x7F)


FOLLOW = "follow"  # Run.extra: followed through fork events although it has a cgroup


def follows(run: Run) -> bool:
    """Whether the run's processes are followed through fork events: a run
    without a cgroup, or one whose cgroup its user could move them out of."""
    return not run.cgroup or bool(run.extra.get(FOLLOW))


SCOPE_REFUSED = "scope_refused"  # Run.extra: why systemd refused the run a scope (it got a plain cgroup)
BUDGET = "memory_max"  # Run.extra: the run's memory budget in bytes (oom-protect --memory-max)


def budget_of(run: Run) -> int | None:
    value = run.extra.get(BUDGET)
    return value if isinstance(value, int) else None


def scope_refusal(run: Run) -> str | None:
    value = run.extra.get(SCOPE_REFUSED)
    return value if isinstance(value, str) else None
