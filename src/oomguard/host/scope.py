"""systemd transient scopes, asked for over D-Bus with ``busctl`` (an argv
list, never a shell). systemd creates the scope's cgroup and moves the pid
into it; the call can take seconds on a busy manager, so callers keep it
off any loop that must answer quickly."""

from __future__ import annotations

import subprocess

SCOPE_TIMEOUT = 5.0


def scope_argv(name: str, pid: int, slice_: str, description: str) -> list[str]:
    """busctl call that asks systemd for a transient scope holding ``pid``."""
    return [
        "busctl", "call", "--system", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))",
        name, "fail", "3",
        "PIDs", "au", "1", str(pid),
        "Slice", "s", slice_,
        "Description", "s", description,
        "0",
    ]  # fmt: skip


def start_scope(name: str, pid: int, slice_: str, description: str, timeout: float = SCOPE_TIMEOUT) -> str | None:
    """Start the scope; None when systemd made it, else why not."""
    try:
        r = subprocess.run(scope_argv(name, pid, slice_, description), capture_output=True, timeout=timeout,
                           check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if r.returncode != 0:
        return r.stderr.decode(errors="replace").strip() or f"busctl exited {r.returncode}"
    return None
