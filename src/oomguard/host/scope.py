"""systemd transient scopes, asked for over D-Bus with ``busctl`` (an argv
list, never a shell). systemd creates the scope's cgroup and moves the pid
into it; the call can take seconds on a busy manager, so callers keep it
off any loop that must answer quickly."""

from __future__ import annotations

import subprocess

SCOPE_TIMEOUT = 5.0


def scope_argv(name: str, pid: int, slice_: str, description: str, memory_max: int | None = None) -> list[str]:
    """busctl call that asks systemd for a transient scope holding ``pid``;
    with ``memory_max``, a budget on memory and no swap."""
    budget = [] if memory_max is None else ["MemoryMax", "t", str(memory_max), "MemorySwapMax", "t", "0"]
    return [
        "busctl", "call", "--system", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))",
        name, "fail", str(3 + len(budget) // 3),
        "PIDs", "au", "1", str(pid),
        "Slice", "s", slice_,
        "Description", "s", description,
        *budget,
        "0",
    ]  # fmt: skip


def start_scope(
    name: str, pid: int, slice_: str, description: str, timeout: float = SCOPE_TIMEOUT, *,
    memory_max: int | None = None,
) -> str | None:
    """Start the scope; None when systemd made it, else why not."""
    try:
        r = subprocess.run(scope_argv(name, pid, slice_, description, memory_max), capture_output=True,
                           timeout=timeout, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if r.returncode != 0:
        return r.stderr.decode(errors="replace").strip() or f"busctl exited {r.returncode}"
    return None
