"""A run as replies and events show it: the one JSON shape of a run."""

from __future__ import annotations

from oomguard.runs.run import Run, budget_of, scope_refusal


def run_view(run: Run) -> dict:
    return {
        "id": run.id,
        "user": run.user,
        "uid": run.uid,
        "pid": run.pid,
        "command": run.command,
        "cgroup": run.cgroup,
        "tty": run.tty,
        "started": run.started,
        "ended": run.ended,
        "exit_status": run.exit_status,
        "peak_memory": run.peak_memory,
        "end_reason": run.end_reason,
        "memory_max": budget_of(run),  # its budget (oom-protect --memory-max), None for none
        "scope_refused": scope_refusal(run),  # why systemd refused a scope, None if not refused
    }
