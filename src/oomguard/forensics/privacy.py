"""What a non-root user may see of a stored event.

An event names every uid it concerns, so one OOM kill is shown to the
victim's owner and to each user whose protected run was alive. Each of them
sees their own part only: other users' runs (their commands included), and a
victim or cgroup that is not theirs, are taken out. Root sees everything.
"""

from __future__ import annotations

from typing import Any

# Fields of a kernel OOM event that describe the victim and where it lived.
VICTIM_FIELDS = ("victim_pid", "victim_comm", "victim_uid", "task_memcg", "oom_memcg")
# The allocating task may be anyone's.
INVOKER_FIELDS = ("invoker_comm", "invoker_pid")
OOM_KINDS = ("oom_kill", "oom_report", "oom_livelock")


def event_for(event: dict[str, Any], uid: int | None) -> dict[str, Any]:
    """``event`` as user ``uid`` may see it (``None`` or 0: root, unchanged)."""
    if not uid:
        return event
    data = dict(event.get("data") or {})
    hidden = 0
    for key, value in list(data.items()):
        if isinstance(value, list) and any(_owned_by_other(v, uid) for v in value):
            kept = [v for v in value if not _owned_by_other(v, uid)]
            hidden += len(value) - len(kept)
            data[key] = kept
    if event.get("kind") in OOM_KINDS:
        for f in INVOKER_FIELDS:
            data.pop(f, None)
        if data.get("victim_uid") != uid:
            for f in VICTIM_FIELDS:
                data.pop(f, None)
            if event.get("kind") == "oom_kill":
                data["victim"] = "another user's process"
    if hidden:
        data["other_users_hidden"] = hidden
    return {**event, "data": data, "uids": [uid]}


def events_for(events: list[dict[str, Any]], uid: int | None) -> list[dict[str, Any]]:
    return [event_for(e, uid) for e in events]


def _owned_by_other(item: object, uid: int) -> bool:
    return isinstance(item, dict) and "uid" in item and item["uid"] != uid
