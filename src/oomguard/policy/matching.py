"""Which class a process is in: one class's matchers against one process.

Within a class every matcher kind that is given must match (comm AND exe AND
user AND unit AND cgroup AND cmdline AND parent), and within one kind any listed pattern
may match. Cheap matchers go first; the parent's class is computed last.
"""

from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatchcase

from oomguard.config import PolicyClass, parse_policy_class
from oomguard.host import cgroups, cmdline, procfs

DELETED = " (deleted)"


def _exe_for_match(exe: str | None, privileged: bool) -> str | None:
    """The path an exe glob is matched against.

    The kernel appends " (deleted)" when the binary was replaced or removed.
    An ordinary class still matches the old path (a php-fpm worker after a
    package upgrade is still a php-fpm worker), but a privileged class does
    not: nothing vouches any more for what that file was."""
    if exe is None:
        return None
    if exe.endswith(DELETED):
        return None if privileged else exe[: -len(DELETED)]
    return exe


def _any(patterns: tuple[str, ...], value: str | None) -> bool:
    return value is not None and any(fnmatchcase(value, p) for p in patterns)


def matches(
    cls: PolicyClass,
    proc: procfs.Proc,
    parent_class: Callable[[], PolicyClass | None] = lambda: None,
) -> bool:
    """Whether ``proc`` is in ``cls``. Cheap matchers go first; the parent's
    class is only computed when everything else already matched."""
    if cls.user and proc.uid not in cls.user:
        return False
    if cls.comm and not _any(cls.comm, proc.comm):
        return False
    if cls.exe and not _any(cls.exe, _exe_for_match(proc.exe, cls.privileged)):
        return False
    if cls.unit and not _any(cls.unit, cgroups.unit_of(proc.cgroup)):
        return False
    if cls.cgroup and not _any(cls.cgroup, proc.cgroup):
        return False
    if cls.cmdline and not _any(cls.cmdline, cmdline.cmdline_for_match(proc.pid)):
        return False
    if cls.parent:
        pc = parent_class()
        if pc is None or pc.name not in cls.parent:
            return False
    return True


def self_class(classes: tuple[PolicyClass, ...]) -> PolicyClass:
    for c in classes:
        if c.name == "oomguard":
            return c
    return parse_policy_class(
        {"name": "oomguard", "oom_score_adj": -1000, "user": [0], "unit": ["oomguard.service"],
         "healer_exempt": True},
        "policy.self",
    )
