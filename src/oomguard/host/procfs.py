"""Everything oomguard reads from or writes to /proc.

Functions take a pid, or a ``dir_fd`` of an already opened ``/proc/<pid>``
directory. The dir_fd form is what the broker uses: such an fd stays bound to
the process it was opened for, so a reused pid cannot redirect a read or write
to another process (the kernel answers ESRCH once the original is gone).
Processes vanish at any moment; readers return None rather than raise where a
vanished process is a normal outcome.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

PROC = os.environ.get("OOMGUARD_PROC", "/proc")
T = TypeVar("T")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
OOM_SCORE_ADJ_MIN = -1000  # the OOM killer never picks a process at this value
PF_KTHREAD = 0x00200000  # stat's flags: a kernel thread



class NoSuchProcess(ProcessLookupError, FileNotFoundError):
    """The process is gone (or its pid now names another one). The one error
    the host layer raises for that, as psutil's ``NoSuchProcess``; it is both
    a ProcessLookupError and a FileNotFoundError, so older handlers still hold."""

    def __init__(self, pid: int | str, why: str = "gone"):
        super().__init__(errno.ESRCH, f"process {pid}: {why}")
        self.pid = pid
        self.why = why


# Errors that mean "the process is gone or hides from us": not a bug.
GONE = (FileNotFoundError, ProcessLookupError)


def _path(pid: int | str, name: str) -> str:
    return f"{PROC}/{pid}/{name}"


def _read(name: str, pid: int | str = "self", dir_fd: int | None = None, limit: int = 65536) -> bytes:
    try:
        if dir_fd is not None:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        else:
            fd = os.open(_path(pid, name), os.O_RDONLY | os.O_CLOEXEC)
    except GONE:
        raise NoSuchProcess(pid) from None
    try:
        chunks, total = [], 0
        while total < limit:
            try:
                chunk = os.read(fd, min(65536, limit - total))
            except ProcessLookupError:
                raise NoSuchProcess(pid) from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def open_dir(pid: int) -> int:
    """An O_DIRECTORY fd on /proc/<pid>; raises NoSuchProcess if gone."""
    try:
        return os.open(_path(pid, ""), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NoSuchProcess(pid) from None


def list_pids() -> list[int]:
    return [int(name) for name in os.listdir(PROC) if name.isdigit()]


# ---------------------------------------------------------------- stat


@dataclass(frozen=True)
class Stat:
    pid: int
    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    tty_nr: int
    starttime: int  # clock ticks after boot (field 22)
    rss_pages: int
    flags: int = 0  # field 9: PF_* (PF_KTHREAD)


def parse_stat(data: bytes) -> Stat:
    """Parse /proc/<pid>/stat. comm may hold spaces and parentheses, so split
    at the *last* ')' as psutil does."""
    head, _, tail = data.rpartition(b")")
    pid_s, _, comm = head.partition(b" (")
    f = tail.split()
    # f[0] is field 3 (state); field N is f[N - 3]
    return Stat(
        pid=int(pid_s),
        comm=comm.decode("utf-8", "replace"),
        state=f[0].decode(),
        ppid=int(f[1]),
        pgrp=int(f[2]),
        session=int(f[3]),
        tty_nr=int(f[4]),
        starttime=int(f[19]),
        rss_pages=int(f[21]),
        flags=int(f[6]),
    )


def read_stat(pid: int | str = "self", dir_fd: int | None = None) -> Stat:
    return parse_stat(_read("stat", pid, dir_fd))


def boot_time() -> float:
    """Wall-clock time of boot (btime in /proc/stat)."""
    with open(f"{PROC}/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    raise RuntimeError("no btime in /proc/stat")


def since_boot() -> float:
    """Seconds since boot, on the clock that stat's starttime counts in."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


# ---------------------------------------------------------------- status


@dataclass(frozen=True)
class Status:
    name: str
    uids: tuple[int, int, int, int]  # real, effective, saved, fs
    gids: tuple[int, int, int, int]
    groups: tuple[int, ...]
    vm_rss_kb: int
    ppid: int
    tgid: int


def parse_status(data: bytes) -> Status:
    fields: dict[bytes, bytes] = {}
    for line in data.splitlines():
        key, sep, value = line.partition(b":")
        if sep:
            fields[key] = value.strip()

    def ids(key: bytes) -> tuple[int, int, int, int]:
        parts = tuple(int(x) for x in fields[key].split())
        if len(parts) != 4:
            raise ValueError(f"malformed {key.decode()} line")
        return parts  # type: ignore[return-value]

    rss = fields.get(b"VmRSS", b"0 kB").split()
    return Status(
        name=fields.get(b"Name", b"").decode("utf-8", "replace"),
        uids=ids(b"Uid"),
        gids=ids(b"Gid"),
        groups=tuple(int(x) for x in fields.get(b"Groups", b"").split()),
        vm_rss_kb=int(rss[0]) if rss else 0,
        ppid=int(fields.get(b"PPid", b"0")),
        tgid=int(fields.get(b"Tgid", b"0")),
    )


def read_status(pid: int | str = "self", dir_fd: int | None = None) -> Status:
    return parse_status(_read("status", pid, dir_fd))


# ---------------------------------------------------------------- oom


def read_oom_score_adj(pid: int | str = "self", dir_fd: int | None = None) -> int:
    return int(_read("oom_score_adj", pid, dir_fd))


def read_oom_score(pid: int | str = "self", dir_fd: int | None = None) -> int:
    return int(_read("oom_score", pid, dir_fd))


def write_oom_score_adj(value: int, pid: int | str = "self", dir_fd: int | None = None) -> None:
    """Write oom_score_adj. Root with CAP_SYS_RESOURCE also sets the task's
    oom_score_adj_min to this value, so the owner cannot go lower later."""
    if dir_fd is not None:
        fd = os.open("oom_score_adj", os.O_WRONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    else:
        fd = os.open(_path(pid, "oom_score_adj"), os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(int(value)).encode())
    finally:
        os.close(fd)


# ---------------------------------------------------------------- identity


def read_exe(pid: int | str = "self", dir_fd: int | None = None) -> str | None:
    """The executable's path, None for kernel threads or unreadable ones.
    A deleted binary keeps its path with ' (deleted)' appended by the kernel."""
    try:
        if dir_fd is not None:
            return os.readlink("exe", dir_fd=dir_fd)
        return os.readlink(_path(pid, "exe"))
    except (FileNotFoundError, PermissionError):
        return None


def parse_cgroup(data: bytes) -> str | None:
    """The cgroup v2 path ("0::/path") from /proc/<pid>/cgroup."""
    for line in data.splitlines():
        if line.startswith(b"0::"):
            return line[3:].decode("utf-8", "replace")
    return None


def read_cgroup(pid: int | str = "self", dir_fd: int | None = None) -> str | None:
    return parse_cgroup(_read("cgroup", pid, dir_fd))


def read_cmdline(pid: int | str = "self", dir_fd: int | None = None, limit: int = 4096) -> list[str]:
    """argv as the process shows it, truncated to ``limit`` bytes.

    Reading another process's cmdline takes its mmap lock and can block for
    as long as a hostile or stalled process wants; use read_cmdline_bounded
    for peers."""
    data = _read("cmdline", pid, dir_fd, limit=limit)
    return [a.decode("utf-8", "replace") for a in data.split(b"\0") if a] if data else []


# ---------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class Proc:
    """One process as oomguard sees it; enough for policy, ranking and runs."""

    pid: int
    ppid: int
    comm: str
    state: str
    uid: int
    starttime: int
    rss_kb: int
    oom_score_adj: int
    oom_score: int
    exe: str | None
    cgroup: str | None
    tty_nr: int

    @property
    def key(self) -> tuple[int, int]:
        """(pid, starttime): identifies a process across pid reuse."""
        return (self.pid, self.starttime)


def _through_dir(pid: int, read: Callable[[int], T | None]) -> T | None:
    """``read(dir_fd)`` on the pid's /proc directory, so that every file it
    reads describes the same process even if the pid is reused meanwhile;
    None if the process is gone or unreadable."""
    try:
        fd = open_dir(pid)
    except (ProcessLookupError, PermissionError):
        return None
    try:
        return read(fd)
    except (*GONE, PermissionError, ValueError, IndexError):
        return None
    finally:
        os.close(fd)


def snapshot(pid: int) -> Proc | None:
    """A consistent-enough view of one process, None if it is gone or a
    kernel thread."""

    def read(fd: int) -> Proc | None:
        st = read_stat(dir_fd=fd)
        status = read_status(dir_fd=fd)
        exe = read_exe(dir_fd=fd)
        if exe is None and st.ppid in (0, 2) and pid != 1:
            return None  # a kernel thread
        return Proc(
            pid=pid,
            ppid=st.ppid,
            comm=st.comm,
            state=st.state,
            uid=status.uids[0],
            starttime=st.starttime,
            rss_kb=status.vm_rss_kb,
            oom_score_adj=read_oom_score_adj(dir_fd=fd),
            oom_score=read_oom_score(dir_fd=fd),
            exe=exe,
            cgroup=read_cgroup(dir_fd=fd),
            tty_nr=st.tty_nr,
        )

    return _through_dir(pid, read)


class Glance(NamedTuple):
    """What `status` shows of a process, read now (a tuple: a frozen
    dataclass costs every importer of this module a millisecond more)."""

    pid: int
    starttime: int
    uid: int  # real uid
    comm: str
    rss_kb: int
    oom_score_adj: int
    cgroup: str | None


def glance(pid: int, starttime: int | None = None, oom_score_adj: int | None = None) -> Glance | None:
    """Process ``pid`` now, through one dir fd; None if it is gone, or is no
    longer (pid, ``starttime``) or at ``oom_score_adj`` when those are given.
    stat and oom_score_adj are read first, so a candidate that is no longer
    one costs two reads. Kernel threads are left out, as ``snapshot`` does."""

    def read(fd: int) -> Glance | None:
        st = read_stat(dir_fd=fd)
        if (starttime is not None and st.starttime != starttime) or st.flags & PF_KTHREAD:
            return None  # the pid was reused, or no process of anyone's
        adj = read_oom_score_adj(dir_fd=fd)
        if oom_score_adj is not None and adj != oom_score_adj:
            return None
        status = read_status(dir_fd=fd)
        return Glance(pid, st.starttime, status.uids[0], st.comm, status.vm_rss_kb, adj, read_cgroup(dir_fd=fd))

    return _through_dir(pid, read)


def iter_processes() -> Iterator[Proc]:
    for pid in list_pids():
        p = snapshot(pid)
        if p is not None:
            yield p


def starttime_of(pid: int) -> int | None:
    try:
        return read_stat(pid).starttime
    except (*GONE, ValueError, IndexError):
        return None


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, 0 if it is gone."""
    try:
        return read_stat(pid).rss_pages * PAGE_SIZE
    except (*GONE, ValueError, IndexError, PermissionError):
        return 0


def running(pid: int, starttime: int) -> bool:
    """Whether the process (pid, starttime) still runs: present, not reused,
    not a zombie waiting for its parent."""
    try:
        st = read_stat(pid)
    except (*GONE, ValueError, IndexError):
        return False
    return st.starttime == starttime and st.state not in ("Z", "X")


# ---------------------------------------------------------------- system


def boot_id() -> str:
    with open(f"{PROC}/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out: dict[str, int] = {}
    with open(f"{PROC}/meminfo", "rb") as f:
        for line in f:
            key, _, rest = line.partition(b":")
            parts = rest.split()
            if parts:
                value = int(parts[0])
                out[key.decode()] = value * 1024 if len(parts) > 1 and parts[1] == b"kB" else value
    return out


def parse_pressure(text: str) -> dict[str, dict[str, float]]:
    """PSI: {"some": {"avg10": .., "avg60": .., "avg300": .., "total": ..}, "full": ...}."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        kind, *pairs = line.split()
        out[kind] = {k: float(v) for k, _, v in (p.partition("=") for p in pairs)}
    return out


def pressure(resource: str = "memory") -> dict[str, dict[str, float]] | None:
    try:
        with open(f"{PROC}/pressure/{resource}") as f:
            return parse_pressure(f.read())
    except OSError:
        return None


def has_cap_sys_resource() -> bool:
    """Whether this process's effective capabilities include CAP_SYS_RESOURCE (24)."""
    try:
        for line in _read("status").splitlines():
            if line.startswith(b"CapEff:"):
                return bool(int(line.split()[1], 16) >> 24 & 1)
    except OSError:
        pass
    return False
