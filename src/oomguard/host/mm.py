"""Which processes share an address space (mm) with a given one.

The kernel keeps ``oom_score_adj`` per mm: writing it for one process sets it
for every process created with ``CLONE_VM`` from it (not threads only). So a
grant to one process is a grant to all of them, and the broker must know
them before it writes. ``kcmp(KCMP_VM)`` is the kernel's own answer to "do
these two share an mm"; it needs ptrace access to both, which root has.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

from oomguard.host import procfs

KCMP_VM = 1
_SYS_KCMP = {"x86_64": 312, "aarch64": 272, "armv7l": 378, "i686": 349, "ppc64le": 354, "s390x": 343}

_libc: ctypes.CDLL | None = None


def _syscall() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def same_mm(a: int, b: int) -> bool:
    """True if ``a`` and ``b`` share one mm. Raises NoSuchProcess when either
    is gone, and OSError when the kernel cannot tell (no kcmp)."""
    nr = _SYS_KCMP.get(platform.machine())
    if nr is None:
        raise OSError(f"kcmp: unknown syscall number on {platform.machine()}")
    rc = _syscall().syscall(nr, a, b, KCMP_VM, 0, 0)
    if rc < 0:
        err = ctypes.get_errno()
        if err == errno.ESRCH:
            raise procfs.NoSuchProcess(b if os.path.exists(f"/proc/{a}") else a)
        raise OSError(err, f"kcmp({a}, {b}): {os.strerror(err)}")
    return rc == 0


def mm_sharers(pid: int) -> list[int]:
    """The other processes (not threads) that share ``pid``'s mm.

    Every process is compared, not only the same user's: a process that made
    itself non-dumpable shows a root-owned /proc entry, and kcmp is cheap
    (one syscall each)."""
    sharers = []
    for other in procfs.list_pids():
        if other == pid:
            continue
        try:
            if same_mm(pid, other):
                sharers.append(other)
        except (procfs.NoSuchProcess, PermissionError):
            continue
    return sharers
