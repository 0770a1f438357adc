"""The socket-only admin queries (`runs`, `events`, `status` when the daemon
answers): one request, one rendering. Both the argparse path (``commands``)
and the start-up fast path (``fast``) print through here, so the two cannot
drift apart. Imports only the client and the renderers: no config schema,
no argparse."""

from __future__ import annotations

from oomguard.cli.client import events, request
from oomguard.cli.render import ago, describe_event, render_run_report, render_status, table


def dump_json(data: object) -> None:
    import json  # only --json pays for json's import (its regular expressions)

    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def show_runs(socket: str, run_id: int | None, all_runs: bool, as_json: bool) -> int:
    """`oomguard runs [ID] [--all] [--json]`."""
    if run_id is not None:
        report = request("runs", socket, id=run_id)["report"]
        if as_json:
            dump_json(report)
        else:
            print(render_run_report(report))
        return 0
    runs = request("runs", socket, all=all_runs)["runs"]
    if as_json:
        dump_json(runs)
        return 0
    if not runs:
        print("no protected runs" if not all_runs else "no runs recorded")
        return 0
    rows = [
        (r["id"], r["user"], r["pid"], ago(r["started"]), ago(r["ended"]) if r["ended"] else "running",
         r["exit_status"] if r["exit_status"] is not None else "-", r["cgroup"] or "-", r["command"][:60])
        for r in runs
    ]  # fmt: skip
    print(table(rows, ("RUN", "USER", "PID", "STARTED", "ENDED", "EXIT", "CGROUP", "COMMAND")))
    return 0


def show_events(socket: str, since: float | None, kinds: list[str] | None, limit: int, as_json: bool) -> int:
    """`oomguard events`, once --since is a timestamp."""
    rows = events(socket, since=since, kinds=kinds, limit=limit)
    if as_json:
        dump_json(rows)
        return 0
    if not rows:
        print("no events")
        return 0
    print(table([(ago(e["ts"]), e["kind"], describe_event(e)) for e in rows], ("TIME", "KIND", "WHAT")))
    return 0


def show_status(data: dict, as_json: bool) -> int:
    """`oomguard status` from the daemon's reply (or the fallback's scan)."""
    if as_json:
        dump_json(data)
        return 0
    print(render_status(data))
    return 0
