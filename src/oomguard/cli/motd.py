"""`oomguard motd`: what happened to the calling user since their last login.

Run from /etc/profile.d at every login shell. It prints nothing when nothing
happened, and nothing (exit 0) when the daemon cannot be asked: a login must
never fail or wait because of it. The daemon answers with the caller's own
events only (SO_PEERCRED), as for `oomguard events`. What was shown is
remembered in the user's own state directory, so each notice is shown once.
"""

from __future__ import annotations

import os
import sys
import time

from oomguard.cli.client import DaemonError, request
from oomguard.cli.terminal import printable

TYPE_CHECKING = False  # importing typing for it costs a login 4 ms

if TYPE_CHECKING:  # pathlib and typing would add a third to a login's cost
    from collections.abc import Sequence
    from typing import Any

KINDS = ("oom_kill", "healer", "storm")
FIRST_LOOK_BACK = 7 * 86400.0
LINES_MAX = 8
TIMEOUT = 2.0
STOPPED = ("killed", "spared_some", "kill_failed")


def seen_file() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "oomguard", "motd-seen")


def read_seen(path: str, now: float) -> float:
    try:
        with open(path) as f:
            value = float(f.read(64).strip())
    except (OSError, ValueError):
        return now - FIRST_LOOK_BACK
    return value if value <= now else now - FIRST_LOOK_BACK


def write_seen(path: str, when: float) -> None:
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(f"{when:.3f}\n")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: shown again next time, which is the safe side


def _at(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "?"


def describe(event: dict[str, Any], uid: int) -> str | None:
    """One line for one of the user's events, or None when it says nothing to them."""
    d = event.get("data") or {}
    kind, at = event.get("kind"), _at(event.get("ts"))
    if kind == "oom_kill":
        if d.get("victim_uid") == uid:
            return f"{at}  the kernel's OOM killer killed your process {printable(d.get('victim_comm'))} (pid {d.get('victim_pid')})"
        runs = [str(r.get("id")) for r in d.get("protected_runs") or [] if r.get("uid") == uid]
        if runs:
            return f"{at}  the kernel's OOM killer killed a process while your protected run {', '.join(runs)} was alive"
        return None
    if kind == "healer" and d.get("action") in STOPPED and d.get("run") is not None:
        what = printable(str(d.get("command") or "")[:60])
        return f"{at}  the healer stopped your protected run {d.get('run')} ({what}): {printable(d.get('reason'))}"
    if kind == "storm" and d.get("action") == "kill_nonessential":
        mine = [k for k in d.get("killed") or [] if k.get("uid") == uid]
        if mine:
            names = ", ".join(f"{printable(k.get('comm'))} ({k.get('pid')})" for k in mine[:5])
            return f"{at}  the OOM-storm guard killed your process{'es' if len(mine) > 1 else ''} {names}"
    return None


def render(events: Sequence[dict[str, Any]], uid: int, since: float) -> str:
    lines = [line for e in events if (line := describe(e, uid))]
    if not lines:
        return ""
    shown = lines[-LINES_MAX:]
    more = len(lines) - len(shown)
    out = [f"oomguard: since {_at(since)}:"]
    if more:
        out.append(f"  ... and {more} earlier")
    out += [f"  {line}" for line in shown]
    out.append(f"  details: oomguard events --since '{_at(since)}'")
    return "\n".join(out)


def main(socket: str | None = None) -> int:
    now = time.time()
    path = seen_file()
    since = read_seen(path, now)
    try:
        reply = request("events", socket, timeout=TIMEOUT, since=since, kinds=list(KINDS), limit=200, page=200)
    except DaemonError:
        return 0
    text = render(reply.get("events") or [], os.getuid(), since)
    if text:
        print(text, file=sys.stdout)
    write_seen(path, now)
    return 0
