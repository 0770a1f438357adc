"""``[layout]``: the memory layout ``oomguard setup`` writes."""

from __future__ import annotations

from dataclasses import dataclass

from oomguard.config.table import Table
from oomguard.config.values import ConfigError, parse_size, resolve_user


@dataclass(frozen=True)
class LayoutConfig:
    app_user: str = "app"
    app_cgroup: str = "oomguard.app"  # cgroup v2 path, for hosts without systemd
    app_slice: str = "oomguard-app.slice"
    system_reserve: int = 512 << 20
    daemon_memory_min: int = 64 << 20
    services: tuple[str, ...] = ("nginx.service", "php8.2-fpm.service", "mariadb.service")


def parse_layout(t: Table) -> LayoutConfig:
    cgroup = t.get("app_cgroup", kind=str).strip("/")
    if not cgroup or ".." in cgroup.split("/"):
        raise ConfigError(f"{t.k('app_cgroup')}: must be a relative cgroup path like 'oomguard.app'")
    slice_ = t.get("app_slice", kind=str)
    if not slice_.endswith(".slice"):
        raise ConfigError(f"{t.k('app_slice')}: must end in .slice")
    cfg = LayoutConfig(
        app_user=t.get("app_user", kind=str),
        app_cgroup=cgroup,
        app_slice=slice_,
        system_reserve=parse_size(t.get("system_reserve"), t.k("system_reserve")),
        daemon_memory_min=parse_size(t.get("daemon_memory_min"), t.k("daemon_memory_min")),
        services=t.str_list("services") if "services" in t.data else LayoutConfig.services,
    )
    if "app_user" in t.data:
        resolve_user(cfg.app_user, t.k("app_user"))
    t.done()
    return cfg
