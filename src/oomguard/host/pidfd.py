"""One process pinned against pid reuse: a pidfd plus an fd on its /proc dir.

Open the pidfd, then the /proc directory, then check that the pidfd's process
has not exited: if it still runs, the pid was not reused in between, so both
fds name the same process for good. Reads and writes then go through the
directory fd, and signals through the pidfd. This is the one pin-and-check
helper; the broker, the killer, the storm guard and the policy all use it.
"""

from __future__ import annotations

import os
import select
import signal

from oomguard.host import procfs
from oomguard.host.procfs import NoSuchProcess


def exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited (zombies included)."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


class Pinned:
    """Use ``Pinned.open``; close it (or use it as a context manager)."""

    def __init__(self, pid: int, pidfd: int, dirfd: int, stat: procfs.Stat):
        self.pid = pid
        self.pidfd = pidfd
        self.dirfd = dirfd
        self.stat = stat  # as read right after pinning

    @property
    def starttime(self) -> int:
        return self.stat.starttime

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.stat.starttime)

    @classmethod
    def open(cls, pid: int, *, expect_start: int | None = None, pidfd: int | None = None) -> Pinned:
        """Pin ``pid``; NoSuchProcess if it is gone, or if ``expect_start`` is
        given and the pid now names another process. A ``pidfd`` passed in
        (SO_PEERPIDFD) is adopted: it is closed with the pin, or on failure."""
        dirfd = -1
        try:
            if pidfd is None:
                try:
                    pidfd = os.pidfd_open(pid)
                except ProcessLookupError:
                    raise NoSuchProcess(pid) from None
            dirfd = procfs.open_dir(pid)
            if exited(pidfd):
                raise NoSuchProcess(pid)
            st = procfs.read_stat(dir_fd=dirfd)
            if expect_start is not None and st.starttime != expect_start:
                raise NoSuchProcess(pid, "pid reused")
        except BaseException:
            for fd in (pidfd, dirfd):
                if fd is not None and fd >= 0:
                    os.close(fd)
            raise
        return cls(pid, pidfd, dirfd, st)

    def exited(self) -> bool:
        return self.pidfd < 0 or exited(self.pidfd)

    def send(self, sig: int = signal.SIGKILL) -> bool:
        """Signal the pinned process; False if it is already gone."""
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
            return True
        except ProcessLookupError:
            return False

    def read_stat(self) -> procfs.Stat:
        return procfs.read_stat(self.pid, dir_fd=self.dirfd)

    def read_status(self) -> procfs.Status:
        return procfs.read_status(self.pid, dir_fd=self.dirfd)

    def read_cgroup(self) -> str | None:
        return procfs.read_cgroup(self.pid, dir_fd=self.dirfd)

    def read_oom_score_adj(self) -> int:
        return procfs.read_oom_score_adj(self.pid, dir_fd=self.dirfd)

    def write_oom_score_adj(self, value: int) -> None:
        """Through the pinned directory: a reused pid cannot be written."""
        try:
            procfs.write_oom_score_adj(value, dir_fd=self.dirfd)
        except ProcessLookupError:
            raise NoSuchProcess(self.pid) from None

    def close(self) -> None:
        for name in ("pidfd", "dirfd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def __enter__(self) -> Pinned:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
