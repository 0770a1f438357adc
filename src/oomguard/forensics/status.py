"""The numbers behind `oomguard status`, gathered in one place."""

from __future__ import annotations

from typing import Any

from oomguard.config import Config
from oomguard.host import cgroups, procfs


def memory() -> dict[str, Any]:
    mi = procfs.meminfo()
    return {
        "total": mi.get("MemTotal"),
        "available": mi.get("MemAvailable"),
        "swap_total": mi.get("SwapTotal"),
        "swap_free": mi.get("SwapFree"),
    }


def pressure_summary(text: dict[str, dict[str, float]] | None) -> dict[str, float] | None:
    if not text:
        return None
    return {
        "some_avg10": text.get("some", {}).get("avg10", 0.0),
        "full_avg10": text.get("full", {}).get("avg10", 0.0),
    }


def app_slice(cfg: Config) -> dict[str, Any]:
    """The app cgroup's usage against its limit (the systemd slice, or the
    plain cgroup on a host without systemd)."""
    cg = cgroups.app_group(cfg.layout.app_slice, cfg.layout.app_cgroup)
    if cg == "/" or not cgroups.exists(cg):
        return {"cgroup": None}
    events = cgroups.memory_events(cg)
    psi = cgroups.pressure(cg)
    return {
        "cgroup": cg,
        "current": cgroups.memory_current(cg),
        "max": cgroups.memory_max(cg),
        "oom": events.get("oom", 0),
        "oom_kill": events.get("oom_kill", 0),
        "pressure": pressure_summary(procfs.parse_pressure(psi)) if psi else None,
    }


def protected_processes(uid: int | None = None) -> list[dict[str, Any]]:
    """Every process at -1000 now (root's view, or one user's)."""
    out = []
    for p in procfs.iter_processes():
        if p.oom_score_adj == -1000 and (uid is None or p.uid == uid):
            out.append({"pid": p.pid, "uid": p.uid, "comm": p.comm, "rss_kb": p.rss_kb, "cgroup": p.cgroup})
    return out


def collect(cfg: Config) -> dict[str, Any]:
    """What any process can see without the daemon."""
    return {
        "memory": memory(),
        "pressure": pressure_summary(procfs.pressure("memory")),
        "app": app_slice(cfg),
    }
