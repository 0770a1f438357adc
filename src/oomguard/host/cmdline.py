"""Other processes' command lines, read without letting them stall us.

Reading another process's cmdline takes its mmap lock, which a hostile or
stalled process can hold for as long as it wants: each read runs in a
thread of its own that is waited for only ``timeout`` seconds, and at most
CMDLINE_READERS such threads are ever alive.
"""

from __future__ import annotations

import threading

from oomguard.host import procfs

CMDLINE_READERS = 8
# A slot is held by the reading thread until its read returns, not until its
# caller stops waiting, so stuck readers (a process that holds its mmap lock
# forever) are bounded too.
_cmdline_slots = threading.BoundedSemaphore(CMDLINE_READERS)


def read_cmdline_bounded(pid: int, dir_fd: int | None = None, timeout: float = 0.2, limit: int = 1024) -> str:
    """cmdline for logs: bounded in time and size, never raises, and never
    more than CMDLINE_READERS reading threads alive at once."""
    text, failure = _cmdline_within(pid, dir_fd, timeout, limit)
    return (failure if text is None else text)[:limit]


def cmdline_for_match(pid: int, dir_fd: int | None = None, timeout: float = 0.2, limit: int = 4096) -> str | None:
    """The command line joined by spaces, for a policy glob; None when it
    could not be read in time (so a failed read matches nothing)."""
    text, _failure = _cmdline_within(pid, dir_fd, timeout, limit)
    return text


def _cmdline_within(pid: int, dir_fd: int | None, timeout: float, limit: int) -> tuple[str | None, str]:
    if not _cmdline_slots.acquire(blocking=False):
        return None, "<cmdline not read: readers busy>"
    result: list[str | None] = []
    failure: list[str] = []

    def work() -> None:
        try:
            result.append(" ".join(procfs.read_cmdline(pid, dir_fd, limit=limit)))
        except Exception as e:  # noqa: BLE001 - a log line must never fail
            failure.append(f"<unreadable: {e.__class__.__name__}>")
        finally:
            _cmdline_slots.release()

    t = threading.Thread(target=work, name=f"cmdline-{pid}", daemon=True)
    t.start()
    t.join(timeout)
    if result:
        return result[0], ""
    return None, failure[0] if failure else "<cmdline read timed out>"
