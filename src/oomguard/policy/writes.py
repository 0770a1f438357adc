"""Carrying out decisions: each write through one fd of /proc/<pid> after
checking the start time, and under the registry's lock with protection
checked once more, so that a grant is never overwritten."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from oomguard.host import procfs
from oomguard.policy.decisions import Change, Decision
from oomguard.runs.registry import RunRegistry


def _write_checked(pid: int, starttime: int, value: int) -> None:
    """Write through one fd of /proc/<pid>, after making sure it is still
    the process we decided about (ProcessLookupError otherwise)."""
    fd = procfs.open_dir(pid)
    try:
        if procfs.read_stat(dir_fd=fd).starttime != starttime:
            raise ProcessLookupError(errno.ESRCH, f"pid {pid} was reused")
        procfs.write_oom_score_adj(value, dir_fd=fd)
    finally:
        os.close(fd)


def apply(
    decisions: Iterable[Decision],
    dry_run: bool = False,
    *,
    registry: RunRegistry | None = None,
) -> list[Change]:
    """Carry out the "set" decisions. Vanished processes are skipped
    silently; other failures (EACCES for a negative value without
    CAP_SYS_RESOURCE, ...) come back as Changes with ``error`` set. With a
    registry, protection is checked once more right before each write, since
    a grant may have landed after the plan was made."""
    out: list[Change] = []
    for d in decisions:
        if d.action != "set" or d.wanted is None:
            continue
        change = Change(d.pid, d.starttime, d.comm, d.uid, d.class_name, d.current, d.wanted,
                        d.reason, dry_run=dry_run)
        if not dry_run:
            try:
                with _registry_lock(registry):
                    if registry is not None and _protected_now(registry, d.pid, d.starttime):
                        continue
                    _write_checked(d.pid, d.starttime, d.wanted)
            except (*procfs.GONE, ValueError, IndexError):
                continue  # exited meanwhile: nothing to do
            except OSError as e:
                hint = " (lowering needs CAP_SYS_RESOURCE)" if e.errno in (errno.EACCES, errno.EPERM) else ""
                change = Change(**{**asdict(change), "error": f"{e.strerror or e}{hint}"})
        out.append(change)
    return out


def _registry_lock(registry: RunRegistry | None) -> Any:
    """The registry's lock, held from the protection check to the write.

    A grant is registered, then written (-1000). Holding this lock while we
    check and write means a grant registered meanwhile is either seen by the
    check or written after our write, never overwritten by it."""
    return registry.lock if registry is not None else contextlib.nullcontext()


def _protected_now(registry: RunRegistry, pid: int, starttime: int) -> bool:
    try:
        cg = procfs.read_cgroup(pid)
    except (*procfs.GONE, PermissionError):
        cg = None
    return registry.is_protected(pid, starttime, cg)
