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

This module holds the classes in force (the built-in defaults, or the
config's) and the CLI's one-off helpers, and re-exports the policy's public
names. The rest is one concern per module: matching.py (one class against
one process), resolver.py (walking parents: classes, protection, inherited
grants), decisions.py (the verdicts), writes.py (carrying them out), and
enforcer.py (keeping the policy in force as processes start).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from oomguard.config import Config, LayoutConfig, PolicyClass, parse_policy_class
from oomguard.host import procfs, users
from oomguard.policy.decisions import (
    ALREADY,
    BY_CLASS,
    INHERITED,
    INIT,
    KERNEL_DEFAULT,
    PROTECTED,
    UNMATCHED,
    ZOMBIE,
    Change,
    Decision,
    decide,
    plan,
)
from oomguard.policy.matching import DELETED, matches
from oomguard.policy.resolver import Resolver
from oomguard.policy.writes import apply
from oomguard.runs.registry import RunRegistry

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
    return name.isdigit() or users.exists(name)


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
        for k in ("comm", "exe", "user", "unit", "cgroup", "cmdline", "parent"):
            v = getattr(c, k)
            if v:
                row[k] = list(v)
        row["essential"] = c.essential
        row["healer_exempt"] = c.healer_exempt
        rows.append(row)
    return rows


__all__ = [
    "ALREADY", "BY_CLASS", "DELETED", "INHERITED", "INIT", "KERNEL_DEFAULT", "PROTECTED", "UNMATCHED",
    "ZOMBIE", "Change", "Decision", "Resolver", "apply", "apply_once", "class_table", "classes_for",
    "decide", "default_class_tables", "default_classes", "matches", "plan", "show",
]  # fmt: skip
