"""The never-kill rules, and pinning a process before it is signalled.

``Guard.refusal`` names why a process must not be signalled: root's (any of
real/effective/saved uid 0), the database, oomguard itself, or whatever the
injected policy test ``is_exempt(proc)`` exempts. ``Guard.pin`` holds the
process by a pidfd (host/pidfd.py ``Pinned``) once the rules allow it, and
``Guard.recheck`` applies them again right before each signal, so a pid
reused meanwhile, or a process that has become untouchable, is never hit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from oomguard.config.policy import OOM_SCORE_ADJ_MIN
from oomguard.host import procfs
from oomguard.host.pidfd import Pinned
from oomguard.host.procfs import NoSuchProcess

log = logging.getLogger(__name__)

# The database's server binaries, matched on the *executable path* (a user
# cannot put files in these directories; comm alone could be forged).
DB_BINARIES = frozenset({"mariadbd", "mysqld", "mariadbd-safe", "mysqld_safe"})
SYSTEM_DIRS = ("/usr/", "/bin/", "/sbin/", "/lib/", "/lib64/", "/opt/")
# What reading a pinned process may raise once it is gone or hides from us.
_UNREADABLE = (*procfs.GONE, ValueError, PermissionError)


SYSTEM_UID_MAX = 999  # Debian's system accounts (mysql among them) are below 1000


def is_database(proc: procfs.Proc, in_run: bool = False) -> bool:
    """The system's database: its server binary, run by a system account,
    outside any user's protected run. A user's own copy of mariadbd (under
    oom-protect, or escaped from a run) is theirs, and ends like the rest."""
    if in_run or not 0 < proc.uid <= SYSTEM_UID_MAX:
        return False
    exe = (proc.exe or "").removesuffix(" (deleted)")
    return os.path.basename(exe) in DB_BINARIES and exe.startswith(SYSTEM_DIRS)


@dataclass
class Handle:
    """One process pinned by a pidfd: signals go to it or to nobody."""

    pinned: Pinned
    comm: str
    uid: int
    state: str
    in_run: bool = False  # part of a user's protected run: never "the database"

    @property
    def pid(self) -> int:
        return self.pinned.pid

    @property
    def starttime(self) -> int:
        return self.pinned.starttime

    def exited(self) -> bool:
        return self.pinned.exited()

    def send(self, sig: int) -> bool:
        return self.pinned.send(sig)

    def close(self) -> None:
        self.pinned.close()


class Guard:
    """What the healer may signal; ``is_exempt`` is the policy's exemption."""

    def __init__(self, is_exempt: Callable[[procfs.Proc], bool]):
        self.is_exempt = is_exempt

    def refusal(self, proc: procfs.Proc, uids: Sequence[int] | None = None, in_run: bool = False) -> str | None:
        """Why ``proc`` must not be signalled, or None if it may be;
        ``in_run``: it belongs to a user's protected run."""
        if proc.pid == os.getpid():
            return "oomguard itself"
        if proc.uid == 0 or (uids is not None and 0 in uids[:3]):
            return "root's process"
        if is_database(proc, in_run):
            return "the database"
        try:
            if self.is_exempt(proc):
                return "exempt by policy"
        except Exception:  # noqa: BLE001 - when in doubt, do not kill
            log.exception("is_exempt(%d) failed; treating it as exempt", proc.pid)
            return "exemption check failed"
        return None

    def pin(
        self, pid: int, expect_start: int | None, require_protected: bool = False, in_run: bool = False
    ) -> tuple[Handle | None, str | None]:
        """A pidfd on ``pid`` if it is the process we mean and may be signalled.

        Inspect, then pin with the start time seen: the pin then refers to
        the inspected process for good, and a later pid reuse cannot
        redirect a signal."""
        proc = procfs.snapshot(pid)
        if proc is None:
            return None, "gone"
        if proc.state == "Z":
            return None, "zombie"
        if expect_start is not None and proc.starttime != expect_start:
            return None, "pid reused"
        try:
            pinned = Pinned.open(pid, expect_start=proc.starttime)
        except NoSuchProcess as e:
            return None, "pid reused" if e.why == "pid reused" else "gone"
        except _UNREADABLE:
            return None, "gone"
        try:
            uids = pinned.read_status().uids
        except _UNREADABLE:
            pinned.close()
            return None, "gone"
        why = self.refusal(proc, uids, in_run)
        if why is None and require_protected and proc.oom_score_adj != OOM_SCORE_ADJ_MIN:
            why = "no longer protected"
        if why is not None:
            pinned.close()
            return None, why
        return Handle(pinned, proc.comm, proc.uid, proc.state, in_run), None

    def recheck(self, h: Handle) -> str | None:
        """Right before a signal: the same process, and still one we may signal."""
        if h.exited():
            return "gone"
        proc = procfs.snapshot(h.pid)
        if proc is None or proc.starttime != h.starttime:
            return "gone"
        try:
            uids = h.pinned.read_status().uids
        except _UNREADABLE:
            return "gone"
        why = self.refusal(proc, uids, h.in_run)
        if why is not None:
            log.warning("pid %d (%s) became %s; not signalling it", h.pid, proc.comm, why)
        return why
