"""The numbers behind `oomguard status`, gathered in one place."""

from __future__ import annotations

from collections.abc import Iterable
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


PROTECTED = procfs.OOM_SCORE_ADJ_MIN


def _view(g: procfs.Glance) -> dict[str, Any]:
    return {"pid": g.pid, "uid": g.uid, "comm": g.comm, "rss_kb": g.rss_kb, "cgroup": g.cgroup}


def protected_processes(uid: int | None = None) -> list[dict[str, Any]]:
    """Every process at -1000 now (root's view, or one user's), by a walk of
    /proc: where no one follows the processes (no process events, no policy).
    Only oom_score_adj is read of each, the rest of those at -1000 only."""
    out = []
    for pid in procfs.list_pids():
        try:
            if procfs.read_oom_score_adj(pid) != PROTECTED:
                continue
        except (*procfs.GONE, PermissionError, ValueError):
            continue
        g = procfs.glance(pid, oom_score_adj=PROTECTED)
        if g is not None and (uid is None or g.uid == uid):
            out.append(_view(g))
    return out


def protected_among(candidates: Iterable[tuple[int, int | None]], adj: int = PROTECTED) -> list[dict[str, Any]]:
    """Those of ``candidates`` that are at ``adj`` now, checked one by one:
    (pid, start time) that must still be that process, or (pid, None) for
    whatever has the pid now (a run's cgroup listed it a moment ago). Each
    pid at most once, in pid order; no walk of /proc."""
    keys = set(candidates)
    found: dict[int, dict[str, Any]] = {}
    # known start times first: a pid they confirm needs no second look
    for pid, start in sorted(keys, key=lambda k: (k[1] is None, k[0], k[1] or 0)):
        if pid not in found and (g := procfs.glance(pid, start, adj)) is not None:
            found[pid] = _view(g)
    return [found[pid] for pid in sorted(found)]


def collect(cfg: Config) -> dict[str, Any]:
    """What any process can see without the daemon."""
    return {
        "memory": memory(),
        "pressure": pressure_summary(procfs.pressure("memory")),
        "app": app_slice(cfg),
    }
