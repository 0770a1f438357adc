"""An event as a hook receives it: OOMGUARD_* variables and a JSON body."""

from __future__ import annotations

import json
from typing import Any

# data key -> variable, for the fields a script most often wants
_FIELDS = {
    "id": "OOMGUARD_RUN_ID",
    "run_id": "OOMGUARD_RUN_ID",
    "uid": "OOMGUARD_UID",
    "user": "OOMGUARD_USER",
    "pid": "OOMGUARD_PID",
    "victim_pid": "OOMGUARD_VICTIM_PID",
    "victim_comm": "OOMGUARD_VICTIM_COMM",
    "victim_uid": "OOMGUARD_VICTIM_UID",
    "task_memcg": "OOMGUARD_CGROUP",
    "oom_memcg": "OOMGUARD_OOM_CGROUP",
    "action": "OOMGUARD_ACTION",
    "reason": "OOMGUARD_REASON",
    "message": "OOMGUARD_MESSAGE",
}
VALUE_MAX = 4096  # a variable's value is cut here; the JSON body has it whole


def environment(event: dict[str, Any]) -> dict[str, str]:
    """The variables for ``event`` (kind, ts, data), besides a fixed PATH."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "OOMGUARD_EVENT": str(event.get("kind", "")),
        "OOMGUARD_TIME": f"{float(event.get('ts') or 0):.3f}",
    }
    if event.get("id") is not None:
        env["OOMGUARD_EVENT_ID"] = str(event["id"])
    data = event.get("data") or {}
    for key, var in _FIELDS.items():
        value = data.get(key)
        if value is None or var in env:
            continue
        if key == "id" and event.get("kind") not in ("grant", "run_end", "warning"):
            continue  # only a run's events carry a run id as "id"
        env[var] = str(value).replace("\0", "")[:VALUE_MAX]
    return env


def body(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), default=str).encode()
