"""Service priorities: which process gets which oom_score_adj.

A policy is an ordered list of classes (config.PolicyClass). The first class
that matches a process wins. Within a class every matcher kind that is given
must match (comm AND exe AND user AND unit AND cgroup AND parent), and within
one kind any listed pattern may match. Anything no class matches is left
alone, with one exception: a negative value a process merely inherited from
an ancestor that the policy lowered is taken back to 0 (see ``Resolver``).

Processes of protected runs (runs.RunRegistry) are never touched.

Writes go through procfs.write_oom_score_adj on an fd of /proc/<pid> after
checking the start time, so a reused pid never receives another process's
value. When root with CAP_SYS_RESOURCE writes, the kernel also records the
value as the task's oom_score_adj_min, which is what stops users from
lowering it again: the point of having a root daemon do this.

This module is the policy itself: classes, matching, decisions and one-off
writes. Keeping it in force as processes start is enforcer.py's job.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from typing import Any

from oomguard.config import Config, LayoutConfig, PolicyClass, parse_policy_class
from oomguard.host import cgroups, procfs
from oomguard.runs.registry import RunRegistry

DELETED = " (deleted)"
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


# ---------------------------------------------------------------- defaults

# Cgroups where root's own processes live on a systemd host ("/" is the root
# cgroup, where everything lives on a host without systemd). The app slice
# and user sessions other than root's are deliberately not in this list, nor
# are container scopes (docker-*.scope), whose runtimes set their own values.
# Root automation: named agents and root's own sessions, not every root
# process. A blanket -1000 on root would make any runaway root service
# unkillable, and every child a root process forks inherits the value; the
# reserve outside the app slice is what keeps root able to act.
ROOT_AUTOMATION_UNITS = [
    "cron.service", "crond.service", "salt-minion.service", "puppet.service",
    "chef-client.service", "ansible-pull.service", "oomguard-*.service",
]  # fmt: skip
ROOT_CGROUPS = ["/user.slice/user-0.slice/*"]


def _user_exists(name: str) -> bool:
    if name.isdigit():
        return True
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def default_class_tables(app_user: str = LayoutConfig.app_user) -> list[dict[str, Any]]:
    """The built-in classes as TOML-shaped tables, in match order.

    Classes whose user does not exist on this host are left out, so that an
    absent app user (or no MySQL) makes those classes match nothing instead
    of failing."""
    tables: list[dict[str, Any]] = [
        # Workers first: a freshly forked worker is still root and still runs
        # the master's binary, so only its parent tells it apart. Workers
        # inherit the master's low value (and its oom_score_adj_min), so the
        # mild value below is written actively, not left alone.
        {
            "name": "php-fpm-worker",
            "oom_score_adj": 200,
            "parent": ["php-fpm-master"],
            "exe": ["/usr/sbin/php-fpm*"],
            "essential": False,
        },
        {
            "name": "nginx-worker",
            "oom_score_adj": 0,
            "parent": ["nginx-master"],
            "exe": ["/usr/sbin/nginx"],
        },
        {
            "name": "php-fpm-master",
            "oom_score_adj": -900,
            "user": ["root"],
            "exe": ["/usr/sbin/php-fpm*"],
        },
        {
            "name": "nginx-master",
            "oom_score_adj": -800,
            "user": ["root"],
            "exe": ["/usr/sbin/nginx"],
        },
    ]
    if _user_exists("mysql"):
        tables += [
            {
                "name": "database",
                "oom_score_adj": -1000,
                "user": ["mysql"],
                "exe": ["/usr/sbin/mariadbd", "/usr/sbin/mysqld"],
            },
            {
                "name": "database-unit",
                "oom_score_adj": -1000,
                "user": ["mysql"],
                "unit": ["mariadb.service", "mysql.service"],
            },
        ]
    tables += [
        {
            "name": "oomguard",
            "oom_score_adj": -1000,
            "user": ["root"],
            "unit": ["oomguard.service"],
            "healer_exempt": True,
        },
        {
            "name": "root-automation",
            "oom_score_adj": -1000,
            "user": ["root"],
            "unit": list(ROOT_AUTOMATION_UNITS),
            "healer_exempt": True,
        },
        {
            "name": "root-sessions",
            "oom_score_adj": -1000,
            "user": ["root"],
            "cgroup": list(ROOT_CGROUPS),
            "healer_exempt": True,
        },
    ]
    app_ok = _user_exists(app_user) and app_user not in ("root", "0")
    if app_ok:
        tables += [
            {
                "name": "app-ssh",
                "oom_score_adj": 1000,
                "user": [app_user],
                "unit": ["session-*.scope"],
                "essential": False,
            },
            {
                "name": "app-cron",
                "oom_score_adj": 1000,
                "user": [app_user],
                "unit": ["cron.service", "crond.service"],
                "essential": False,
            },
            {
                "name": "app-user",
                "oom_score_adj": 1000,
                "user": [app_user],
                "essential": False,
            },
        ]
    return tables


def default_classes(config: Config | None = None) -> tuple[PolicyClass, ...]:
    """The built-in classes, parsed and checked like a config file's."""
    app_user = config.layout.app_user if config is not None else LayoutConfig.app_user
    return tuple(
        parse_policy_class(t, f"policy.defaults[{i}]")
        for i, t in enumerate(default_class_tables(app_user))
    )


def classes_for(config: Config) -> tuple[PolicyClass, ...]:
    """The classes in force: the config's, or the defaults when it has none."""
    if config.policy.classes is not None:
        return config.policy.classes
    return default_classes(config)


# ---------------------------------------------------------------- matching


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
    if cls.parent:
        pc = parent_class()
        if pc is None or pc.name not in cls.parent:
            return False
    return True


def _self_class(classes: tuple[PolicyClass, ...]) -> PolicyClass:
    for c in classes:
        if c.name == "oomguard":
            return c
    return parse_policy_class(
        {"name": "oomguard", "oom_score_adj": -1000, "user": [0], "unit": ["oomguard.service"],
         "healer_exempt": True},
        "policy.self",
    )


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
        class_memo: dict[tuple[int, int], PolicyClass | None] | None = None,
        follow_ancestors: bool = True,
    ):
        self.classes = classes
        self.follow_ancestors = follow_ancestors
        self.lookup = lookup
        self.registry = registry
        self.self_pid = self_pid
        self.self_cls = _self_class(classes) if self_pid is not None else None
        self.class_memo = class_memo if class_memo is not None else {}
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


# ---------------------------------------------------------------- decisions


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


def _write_checked(pid: int, starttime: int, value: int) -> None:
    """Write through one fd of /proc/<pid>, after making sure it is still
    the process we decided about (ProcessLookupError otherwise)."""
    fd = procfs.open_dir(pid)
    try:
        if procfs.read_stat(dir_fd=fd).starttime != starttime:
            raise ProcessLookupError(errno.ESRCH, f"pid {pid} was reused")
        procfs.write_oom_score_adj(value, dir_fd=fd)
    finally:
        os.close(fd)


def apply(
    decisions: Iterable[Decision],
    dry_run: bool = False,
    *,
    registry: RunRegistry | None = None,
) -> list[Change]:
    """Carry out the "set" decisions. Vanished processes are skipped
    silently; other failures (EACCES for a negative value without
    CAP_SYS_RESOURCE, ...) come back as Changes with ``error`` set. With a
    registry, protection is checked once more right before each write, since
    a grant may have landed after the plan was made."""
    out: list[Change] = []
    for d in decisions:
        if d.action != "set" or d.wanted is None:
            continue
        change = Change(d.pid, d.starttime, d.comm, d.uid, d.class_name, d.current, d.wanted,
                        d.reason, dry_run=dry_run)
        if not dry_run:
            try:
                with _registry_lock(registry):
                    if registry is not None and _protected_now(registry, d.pid, d.starttime):
                        continue
                    _write_checked(d.pid, d.starttime, d.wanted)
            except (*procfs.GONE, ValueError, IndexError):
                continue  # exited meanwhile: nothing to do
            except OSError as e:
                hint = " (lowering needs CAP_SYS_RESOURCE)" if e.errno in (errno.EACCES, errno.EPERM) else ""
                change = Change(**{**asdict(change), "error": f"{e.strerror or e}{hint}"})
        out.append(change)
    return out


def _registry_lock(registry: RunRegistry | None) -> Any:
    """The registry's lock, held from the protection check to the write.

    A grant is registered, then written (-1000). Holding this lock while we
    check and write means a grant registered meanwhile is either seen by the
    check or written after our write, never overwritten by it."""
    return registry.lock if registry is not None else contextlib.nullcontext()


def _protected_now(registry: RunRegistry, pid: int, starttime: int) -> bool:
    try:
        cg = procfs.read_cgroup(pid)
    except (*procfs.GONE, PermissionError):
        cg = None
    return registry.is_protected(pid, starttime, cg)


# ---------------------------------------------------------------- helpers for the CLI


def show(config: Config, registry: RunRegistry | None) -> list[Decision]:
    """``oomguard policy show``: every process with its class and values."""
    return plan(procfs.iter_processes(), classes_for(config), registry)


def apply_once(config: Config, registry: RunRegistry | None, dry_run: bool = False) -> list[Change]:
    """``oomguard policy apply [--dry-run]``."""
    return apply(show(config, registry), dry_run, registry=registry)


def class_table(classes: Iterable[PolicyClass]) -> list[dict[str, Any]]:
    """The classes as rows (for docs and ``policy show --classes``)."""
    rows = []
    for c in classes:
        row: dict[str, Any] = {"name": c.name, "oom_score_adj": c.oom_score_adj}
        for k in ("comm", "exe", "user", "unit", "cgroup", "parent"):
            v = getattr(c, k)
            if v:
                row[k] = list(v)
        row["essential"] = c.essential
        row["healer_exempt"] = c.healer_exempt
        rows.append(row)
    return rows


__all__ = [
    "Change", "Decision", "Resolver", "apply", "apply_once", "class_table", "classes_for",
    "decide", "default_class_tables", "default_classes", "matches", "plan", "show",
]
