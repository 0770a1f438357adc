"""The /proc readers behind the OOM ranking (`oomguard top`).

Few syscalls per process, since a busy shop has thousands: one read per
small file, which the kernel produces whole. Each raises procfs.NoSuchProcess
when the process is gone.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from oomguard.host import procfs
from oomguard.host.procfs import GONE, PF_KTHREAD, NoSuchProcess

_O_RDONLY = os.O_RDONLY | os.O_CLOEXEC


def _read_small(path: str, pid: int | str, size: int = 8192) -> bytes:
    """One read of a small /proc file: these are produced whole per read."""
    try:
        fd = os.open(path, _O_RDONLY)
    except GONE:
        raise NoSuchProcess(pid) from None
    try:
        return os.read(fd, size)
    except ProcessLookupError:
        raise NoSuchProcess(pid) from None
    finally:
        os.close(fd)


class OomStatus(NamedTuple):
    """What /proc/<pid>/status adds for the OOM badness. The Vm* lines are
    missing (None) for kernel threads and zombies, which have no mm."""

    name: str
    euid: int
    rss_kb: int
    swap_kb: int | None
    pte_kb: int | None
    ppid: int


def parse_oom_status(data: bytes) -> OomStatus:
    name = ""
    euid = -1
    rss = 0
    swap = pte = None
    ppid = 0
    for line in data.split(b"\n"):
        c = line[:3]  # one slice per line is cheaper than partitioning each
        if c == b"Nam":
            name = line[6:].decode("utf-8", "replace")
        elif c == b"Uid":
            euid = int(line.split()[2])
        elif c == b"PPi":
            ppid = int(line[5:])
        elif c == b"VmR":
            rss = int(line[6:].split()[0])
        elif c == b"VmP" and line.startswith(b"VmPTE"):
            pte = int(line[6:].split()[0])
        elif c == b"VmS" and line.startswith(b"VmSwap"):
            swap = int(line[7:].split()[0])
    return OomStatus(name, euid, rss, swap, pte, ppid)


def read_oom_status(pid: int | str) -> OomStatus:
    return parse_oom_status(_read_small(f"{procfs.PROC}/{pid}/status", pid))


def parse_euid(data: bytes) -> int:
    """The effective uid from a status file: its Uid line alone, found
    without splitting the fifty others (ranking reads thousands)."""
    at = data.find(b"\nUid:")
    if at < 0:
        raise ValueError("no Uid line")
    return int(data[at + 5:data.index(b"\n", at + 5)].split()[1])


class OomSample(NamedTuple):
    """One process as a global OOM ranks it (a tuple: thousands are made per
    ranking, and a frozen dataclass costs several times more to build)."""

    pid: int
    comm: str
    kthread: bool
    starttime: int  # clock ticks after boot
    rss_pages: int
    oom_score: int
    oom_score_adj: int
    uid: int  # effective uid, seen through non-dumpable processes


def read_oom_sample(pid: int, kernel_threads: bool = False) -> OomSample | None:
    """stat, oom_score and oom_score_adj of a process, and its owner; None
    for a kernel thread unless asked for. The /proc directory of a
    non-dumpable process (a php-fpm or nginx worker after setuid) is root's,
    so only then is status read for the real uid. Raises NoSuchProcess,
    PermissionError, or ValueError/IndexError on a malformed file."""
    base = f"{procfs.PROC}/{pid}/"
    data = _read_small(base + "stat", pid, 4096)
    head, _, tail = data.rpartition(b")")
    f = tail.split()
    kthread = bool(int(f[6]) & PF_KTHREAD)
    if kthread and not kernel_threads:
        return None
    score = int(_read_small(base + "oom_score", pid, 32))
    adj = int(_read_small(base + "oom_score_adj", pid, 32))
    try:
        uid = os.stat(base).st_uid
    except GONE:
        raise NoSuchProcess(pid) from None
    if uid == 0:
        uid = parse_euid(_read_small(base + "status", pid))
    comm = head.partition(b" (")[2].decode("utf-8", "replace")
    return OomSample(pid, comm, kthread, int(f[19]), int(f[21]), score, adj, uid)


def swappiness() -> int:
    """vm.swappiness; the kernel's default 60 if unreadable."""
    try:
        return int(_read_small(f"{procfs.PROC}/sys/vm/swappiness", "sysctl", 32))
    except (OSError, ValueError):
        return 60
