"""The policy's verdict on processes: a Decision per process, and the
Change a write makes (or would make, in a dry run)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from oomguard.config import PolicyClass
from oomguard.host import procfs
from oomguard.policy.resolver import Resolver
from oomguard.runs.registry import RunRegistry

KERNEL_DEFAULT = 0

# Skip reasons (Decision.reason when action == "skip").
PROTECTED = "protected run"
UNMATCHED = "unmatched"
ALREADY = "already right"
INIT = "init"
ZOMBIE = "zombie"
# Set reasons.
BY_CLASS = "class"
INHERITED = "inherited grant revoked"


@dataclass(frozen=True)
class Decision:
    pid: int
    starttime: int
    comm: str
    uid: int
    class_name: str | None
    current: int  # oom_score_adj now
    wanted: int | None  # what the policy wants; None: leave alone
    action: str  # "set" or "skip"
    reason: str
    essential: bool = True
    healer_exempt: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.starttime)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Change:
    """One write (or, in a dry run, one write that would happen)."""

    pid: int
    starttime: int
    comm: str
    uid: int
    class_name: str | None
    old: int
    new: int
    reason: str
    dry_run: bool = False
    error: str | None = None  # set when the write failed; nothing changed then

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(proc: procfs.Proc, resolver: Resolver) -> Decision:
    """The policy's verdict on one process."""
    cls = resolver.class_of(proc)
    name = cls.name if cls is not None else None
    base: dict[str, Any] = dict(
        pid=proc.pid, starttime=proc.starttime, comm=proc.comm, uid=proc.uid,
        class_name=name, current=proc.oom_score_adj,
        essential=cls.essential if cls is not None else True,
        healer_exempt=cls.healer_exempt if cls is not None else False,
    )
    if proc.pid == 1:
        return Decision(**base, wanted=None, action="skip", reason=INIT)
    if proc.state == "Z":
        return Decision(**base, wanted=None, action="skip", reason=ZOMBIE)
    if resolver.protected(proc):
        return Decision(**base, wanted=None, action="skip", reason=PROTECTED)
    if cls is None:
        if resolver.inherited_origin(proc) is not None:
            if proc.oom_score_adj == KERNEL_DEFAULT:
                return Decision(**base, wanted=KERNEL_DEFAULT, action="skip", reason=ALREADY)
            return Decision(**base, wanted=KERNEL_DEFAULT, action="set", reason=INHERITED)
        return Decision(**base, wanted=None, action="skip", reason=UNMATCHED)
    if proc.oom_score_adj == cls.oom_score_adj:
        return Decision(**base, wanted=cls.oom_score_adj, action="skip", reason=ALREADY)
    return Decision(**base, wanted=cls.oom_score_adj, action="set", reason=BY_CLASS)


def plan(
    procs: Iterable[procfs.Proc],
    classes: tuple[PolicyClass, ...],
    registry: RunRegistry | None,
    *,
    self_pid: int | None = None,
) -> list[Decision]:
    """A decision for every process of a snapshot, in the snapshot's order."""
    procs = list(procs)
    by_pid = {p.pid: p for p in procs}
    resolver = Resolver(classes, by_pid.get, registry, self_pid)
    return [decide(p, resolver) for p in procs]
