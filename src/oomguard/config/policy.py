"""``[policy]`` and ``[[policy.class]]``: service priorities.

A class is checked whole at load time: its globs must compile and be able to
match, and a privileged class must match on user plus exe, unit or cgroup,
with exe globs that only root can satisfy (see trusted_paths). A cmdline
matcher, which the process's owner controls, may only make a process a
likelier victim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from oomguard.config.table import Table
from oomguard.config.trusted_paths import check_privileged_exe
from oomguard.config.values import ConfigError, check_glob, glob_min_length, resolve_user

OOM_SCORE_ADJ_MIN = -1000
OOM_SCORE_ADJ_MAX = 1000
COMM_MAX = 15  # TASK_COMM_LEN - 1: the kernel truncates comm to this


@dataclass(frozen=True)
class PolicyClass:
    name: str
    oom_score_adj: int
    comm: tuple[str, ...] = ()  # globs on the kernel's comm (15 chars)
    exe: tuple[str, ...] = ()  # globs on /proc/<pid>/exe
    user: tuple[int, ...] = ()  # uids
    unit: tuple[str, ...] = ()  # systemd unit globs, read from the cgroup path
    cgroup: tuple[str, ...] = ()  # cgroup v2 path globs
    parent: tuple[str, ...] = ()  # names of classes the parent must be in
    cmdline: tuple[str, ...] = ()  # globs on the whole command line, args joined by spaces
    essential: bool = True
    healer_exempt: bool = False

    @property
    def privileged(self) -> bool:
        """A class that makes a process harder to kill than the kernel default."""
        return self.oom_score_adj < 0 or self.healer_exempt


@dataclass(frozen=True)
class PolicyConfig:
    enforce: bool = True
    poll_interval: float = 2.0
    classes: tuple[PolicyClass, ...] | None = None  # None: the built-in defaults


def _globs(t: Table, name: str) -> tuple[str, ...]:
    globs = t.str_list(name)
    for i, g in enumerate(globs):
        key = f"{t.k(name)}[{i}]"
        check_glob(g, key)
        if name in ("exe", "cgroup") and g[0] not in "/*?[":
            raise ConfigError(f"{key}: {g!r} can never match: {name} paths are absolute")
        if name == "comm" and glob_min_length(g) > COMM_MAX:
            raise ConfigError(f"{key}: {g!r} can never match: the kernel keeps {COMM_MAX} characters of a comm")
        if name == "unit" and "/" in g:
            raise ConfigError(f"{key}: {g!r} can never match: a unit name has no '/'")
    return globs


def parse_policy_class(data: Any, key: str) -> PolicyClass:
    """One ``[[policy.class]]`` table; also used for the built-in defaults."""
    t = Table(data, key, PolicyClass)
    name = t.get("name", None, str)
    if not name:
        raise ConfigError(f"{t.k('name')}: every class needs a name")
    adj = t.get("oom_score_adj", None, int)
    if adj is None or not OOM_SCORE_ADJ_MIN <= adj <= OOM_SCORE_ADJ_MAX:
        raise ConfigError(f"{t.k('oom_score_adj')}: must be an integer from -1000 to 1000")
    cls = PolicyClass(
        name=name,
        oom_score_adj=adj,
        comm=_globs(t, "comm"),
        exe=_globs(t, "exe"),
        user=tuple(resolve_user(u, f"{t.k('user')}[{i}]") for i, u in enumerate(t.items("user"))),
        unit=_globs(t, "unit"),
        cgroup=_globs(t, "cgroup"),
        parent=t.str_list("parent"),
        cmdline=_globs(t, "cmdline"),
        essential=t.get("essential", kind=bool),
        healer_exempt=t.get("healer_exempt", kind=bool),
    )
    t.done()
    if not (cls.comm or cls.exe or cls.user or cls.unit or cls.cgroup or cls.parent or cls.cmdline):
        raise ConfigError(f"{key}: class {name!r} has no matcher and would match every process")
    if cls.privileged and not (cls.user and (cls.exe or cls.unit or cls.cgroup)):
        raise ConfigError(
            f"{key}: class {name!r} lowers oom_score_adj below 0 or exempts from the healer, "
            "so it must match on user together with exe, unit or cgroup (a name alone can be forged)"
        )
    if cls.cmdline and (cls.privileged or cls.oom_score_adj <= 0):
        raise ConfigError(
            f"{t.k('cmdline')}: class {name!r} matches on the command line, which its owner writes at will; "
            "a cmdline matcher is allowed only in a class that raises oom_score_adj above 0 and is not healer_exempt"
        )
    if cls.privileged:
        for i, g in enumerate(cls.exe):
            check_privileged_exe(g, f"{t.k('exe')}[{i}]")
    return cls


def parse_policy(t: Table) -> PolicyConfig:
    classes = None
    if "class" in t.data:
        classes = tuple(parse_policy_class(c.data, c.key) for c in t.array("class"))
        names = [c.name for c in classes]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"{t.k('class')}: duplicate class name {sorted(dup)[0]!r}")
        for i, c in enumerate(classes):
            for p in c.parent:
                if p not in names:
                    raise ConfigError(f"{t.k('class')}[{i}].parent: unknown class {p!r}")
    cfg = PolicyConfig(
        enforce=t.get("enforce", kind=bool),
        poll_interval=t.duration("poll_interval"),
        classes=classes,
    )
    t.done()
    return cfg
