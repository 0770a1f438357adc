"""One protected run's report: `oomguard runs ID`.

How long it ran, its peak memory, the kernel OOM kills that happened while
it was alive (with their victims, as the asker may see them) and what ended
it: its own exit, the healer, its memory budget, or an administrator or
its owner.
"""

from __future__ import annotations

from typing import Any

MAX_KILLS = 500  # events looked at for one report

# end_reason prefixes -> who ended the run, for people
_ENDERS = (
    ("killed by healer", "the healer (the shop was down past the grace)"),
    ("exited", "its own exit"),
    ("exceeded its", "its memory budget (oom-protect --memory-max)"),
)


def build(run: dict[str, Any], oom_kills: list[dict[str, Any]], healer_events: list[dict[str, Any]],
          now: float) -> dict[str, Any]:  # fmt: skip
    """The report of ``run`` (a run view) from the events that may name it,
    already filtered for the asker's privacy."""
    end = run.get("ended") or now
    during = [e for e in oom_kills if _names_run(e, run["id"]) and run["started"] <= e["ts"] <= end]
    stops = [e for e in healer_events if (e.get("data") or {}).get("run") == run["id"]]
    return {
        "run": run,
        "duration": round(max(0.0, end - run["started"]), 3),
        "running": run.get("ended") is None,
        "peak_memory": run.get("peak_memory"),
        "oom_kills": [{"ts": e["ts"], **_victim(e)} for e in during],
        "ended_by": ended_by(run, stops),
    }


def ended_by(run: dict[str, Any], stops: list[dict[str, Any]]) -> str | None:
    if run.get("ended") is None:
        return None
    reason = str(run.get("end_reason") or "")
    for prefix, who in _ENDERS:
        if reason.startswith(prefix):
            return who
    whys = [str((e.get("data") or {}).get("why") or "") for e in stops]
    for why in whys:
        if "kill-run" in why:
            return why
    return reason or "unknown"


def _names_run(event: dict[str, Any], run_id: int) -> bool:
    runs = (event.get("data") or {}).get("protected_runs") or []
    return any(isinstance(r, dict) and r.get("id") == run_id for r in runs)


def _victim(event: dict[str, Any]) -> dict[str, Any]:
    d = event.get("data") or {}
    if "victim" in d:  # another user's process, as privacy shows it
        return {"victim": d["victim"], "oom_memcg": d.get("oom_memcg")}
    return {"victim_pid": d.get("victim_pid"), "victim_comm": d.get("victim_comm"),
            "victim_uid": d.get("victim_uid"), "oom_memcg": d.get("oom_memcg")}  # fmt: skip


def summary(report: dict[str, Any]) -> str:
    """One line for the run's terminal at its end (oom-protect --report)."""
    run = report["run"]
    peak = report["peak_memory"]
    kills = report["oom_kills"]
    return (
        f"oomguard: run {run['id']} ended after {round(report['duration'])} s"
        f" ({report['ended_by'] or 'running'}, exit status {run.get('exit_status')});"
        f" peak memory {'-' if peak is None else f'{peak / (1 << 20):.0f} MiB'};"
        f" {len(kills)} OOM kill{'s' if len(kills) != 1 else ''} while it ran"
    )
