"""``[protect]``: who may ask the broker for protection, and its limits."""

from __future__ import annotations

from dataclasses import dataclass

from oomguard.config.table import Table
from oomguard.config.values import ConfigError, resolve_group, resolve_user

DEFAULT_SOCKET = "/run/oomguard/protect.sock"


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
    )
    t.done()
    return cfg


USER_SETTINGS = ("permissive",)  # prefs.settings.KNOWN's names


def _user_settings(t: Table) -> tuple[str, ...]:
    names = t.str_list("user_settings")
    for i, name in enumerate(names):
        if name not in USER_SETTINGS:
            raise ConfigError(f"{t.k('user_settings')}[{i}]: unknown setting {name!r}; known: {', '.join(USER_SETTINGS)}")
    return tuple(dict.fromkeys(names))
