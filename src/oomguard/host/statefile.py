"""Small state files that must survive a crash: written whole or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write to a temp file, fsync, rename over the target, fsync the dir:
    a reader (or a daemon restarted after SIGKILL) sees the old or the new
    content, never a torn one."""
    write_text_atomic(path, json.dumps(data, sort_keys=True))


def write_text_atomic(
    path: str | os.PathLike[str], text: str, *, mode: int = 0o600, parents: bool = True
) -> None:
    """write_json_atomic for text the caller encoded already. ``mode`` is
    set whatever the umask; ``parents=False`` leaves a missing directory an
    error (FileNotFoundError) instead of creating it."""
    target = Path(path)
    if parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, mode)  # before the rename: no reader sees another mode
            payload = memoryview(text.encode())
            while payload:  # a short write is possible on a nearly full disk
                payload = payload[os.write(fd, payload):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (ENOSPC) leaves no temp file behind
        raise
    dfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_json(path: str | os.PathLike[str], default: Any = None) -> Any:
    """The stored value, or ``default`` if the file is missing or unreadable
    (a corrupt state file must not keep the daemon from starting)."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return default


def remove_stale_temps(directory: str | os.PathLike[str]) -> list[str]:
    """Remove the temp files that writers killed mid-write left in
    ``directory`` (".NAME.PID.tmp" of another pid); their names."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for e in entries:
        parts = e.name.rsplit(".", 2)
        if (e.name.startswith(".") and len(parts) == 3 and parts[2] == "tmp" and parts[1].isdigit()
                and int(parts[1]) != os.getpid() and e.is_file(follow_symlinks=False)):  # fmt: skip
            try:
                os.unlink(e.path)
                removed.append(e.name)
            except FileNotFoundError:
                pass
    return removed

