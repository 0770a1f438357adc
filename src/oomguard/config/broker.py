"""``[protect]``: who may ask the broker for protection, and its limits."""

from __future__ import annotations

from dataclasses import dataclass

from oomguard.config.table import Table
from oomguard.config.values import ConfigError, format_size, parse_size, resolve_group, resolve_user

DEFAULT_SOCKET = "/run/oomguard/protect.sock"
MIN_MEMORY_MAX = 1 << 20  # a smaller budget livelocks before the command has started


@dataclass(frozen=True)
class ProtectConfig:
    socket: str = DEFAULT_SOCKET
    # None means the default: regular login users (UID_MIN..UID_MAX).
    allow_uids: frozenset[int] | None = None
    allow_gids: frozenset[int] = frozenset()
    max_connections: int = 64
    max_connections_per_uid: int = 4
    request_timeout: float = 2.0
    run_cgroups: bool = True
    max_runs_per_uid: int = 64  # active runs one user may hold at once
    user_settings: tuple[str, ...] = ()  # settings users may change for themselves
    # Memory budgets (`oom-protect --memory-max`): the largest a run may ask
    # for (set, every run gets one), and the budget of a run that asks none.
    max_memory_max: int | None = None
    default_memory_max: int | None = None

    def budget(self, asked: int | None) -> int | None:
        """A run's budget: what it asked, else the default, else the most;
        ValueError (the reason) when it asked for more than the most."""
        most = self.max_memory_max
        if asked is not None and most is not None and asked > most:
            raise ValueError(f"a memory budget of {format_size(asked)} is above this host's most, "
                             f"{format_size(most)} ([protect] max_memory_max)")  # fmt: skip
        if asked is not None:
            return asked
        return self.default_memory_max if self.default_memory_max is not None else most


def parse_protect(t: Table) -> ProtectConfig:
    socket = t.get("socket", kind=str)
    if not socket.startswith("/"):
        raise ConfigError(f"{t.k('socket')}: must be an absolute path")
    users = t.get("allow_users", None, list)
    groups = t.get("allow_groups", [], list)
    allow_uids = None
    if users is not None:
        allow_uids = frozenset(resolve_user(u, f"{t.k('allow_users')}[{i}]") for i, u in enumerate(users))
    allow_gids = frozenset(resolve_group(g, f"{t.k('allow_groups')}[{i}]") for i, g in enumerate(groups))
    cfg = ProtectConfig(
        socket=socket,
        allow_uids=allow_uids,
        allow_gids=allow_gids,
        max_connections=t.bounded_int("max_connections", 1, 4096),
        max_connections_per_uid=t.bounded_int("max_connections_per_uid", 1, 1024),
        request_timeout=t.duration("request_timeout"),
        run_cgroups=t.get("run_cgroups", kind=bool),
        max_runs_per_uid=t.bounded_int("max_runs_per_uid", 1, 4096),
        user_settings=_user_settings(t),
        max_memory_max=_budget(t, "max_memory_max"),
        default_memory_max=_budget(t, "default_memory_max"),
    )
    t.done()
    most, default = cfg.max_memory_max, cfg.default_memory_max
    if most is not None and default is not None and default > most:
        raise ConfigError(f"{t.k('default_memory_max')}: {format_size(default)} is above max_memory_max "
                          f"({format_size(most)})")  # fmt: skip
    return cfg


def _budget(t: Table, name: str) -> int | None:
    raw = t.get(name, None)
    if raw is None:
        return None
    size = parse_size(raw, t.k(name))
    if size < MIN_MEMORY_MAX:
        raise ConfigError(f"{t.k(name)}: {raw!r} is below the smallest budget, {format_size(MIN_MEMORY_MAX)}")
    return size


USER_SETTINGS = ("permissive",)  # prefs.settings.KNOWN's names


def _user_settings(t: Table) -> tuple[str, ...]:
    names = t.str_list("user_settings")
    for i, name in enumerate(names):
        if name not in USER_SETTINGS:
            raise ConfigError(f"{t.k('user_settings')}[{i}]: unknown setting {name!r}; known: {', '.join(USER_SETTINGS)}")
    return tuple(dict.fromkeys(names))
