"""systemd's tools, run as argv lists (never a shell).

``run`` is injectable so that callers can be tested without a systemd: it
gets the argv list and must raise on failure, as ``subprocess.run(check=True)``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

SYSTEMCTL = "systemctl"

Runner = Callable[[list[str]], object]


def _run(argv: list[str]) -> object:
    return subprocess.run(argv, check=True)


def systemctl(*args: str, run: Runner | None = None) -> None:
    """``systemctl ARGS...``; raises CalledProcessError (or the runner's error)."""
    (run or _run)([SYSTEMCTL, *args])


def daemon_reload(run: Runner | None = None) -> None:
    """Make systemd read changed unit files."""
    systemctl("daemon-reload", run=run)


def enable_now(unit: str, run: Runner | None = None) -> None:
    """Enable ``unit`` at boot and start it now."""
    systemctl("enable", "--now", unit, run=run)


def disable_now(unit: str, run: Runner | None = None) -> None:
    """Stop ``unit`` now and keep it from starting at boot."""
    systemctl("disable", "--now", unit, run=run)


def show(unit: str, *props: str, timeout: float = 10.0) -> dict[str, str]:
    """``systemctl show -p ... UNIT`` as a dict; {} when systemctl cannot say
    (no systemd, no such unit: systemd answers with defaults then)."""
    argv = [SYSTEMCTL, "show", "--no-pager", *(f"--property={p}" for p in props), unit]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
