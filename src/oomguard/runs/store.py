"""Writing the run registry to disk: atomically, off the registry's lock,
batched, and surviving a full disk.

The registry changes on every grant, fork of a cgroup-less run and end. A
write per change (with its fsync) under the lock that grants and policy
writes need made every fork cost a disk flush. Here a change only marks the
state dirty; ``flush`` takes a snapshot under the lock, releases it, and then
writes. A failed write (ENOSPC, EIO) is logged, at most once a minute, and
the state stays dirty in memory for the next flush.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from oomguard.host import statefile

log = logging.getLogger(__name__)

LOG_EVERY = 60.0  # seconds between two warnings about failing writes


class StateWriter:
    """Dirty tracking plus one writer at a time for one state file.

    ``snapshot`` is called under the registry's lock and returns the file's
    text (cheaply: it must not wait on anything);
    the disk I/O happens after that lock is released, under a lock of its
    own that only writers take."""

    def __init__(self, path: str | Path, lock: threading.RLock, snapshot: Callable[[], str]):
        self.path = Path(path)
        self._lock = lock
        self._snapshot = snapshot
        self._io = threading.Lock()
        self._generation = 0  # bumped by every change
        self._written = 0  # the generation on disk
        self._last_warning = float("-inf")
        self.failures = 0  # writes that failed, for tests and status

    @property
    def dirty(self) -> bool:
        return self._generation != self._written

    def changed(self) -> None:
        """Called with the registry's lock held: remember that a write is due."""
        self._generation += 1

    def mark_written(self) -> None:
        """The state as loaded is what is on disk."""
        self._written = self._generation

    def flush(self) -> bool:
        """Write the state if it changed since the last write; True if the
        file is now current. Never raises for a failed write."""
        with self._io:
            with self._lock:
                generation = self._generation
                if generation == self._written:
                    return True
                data = self._snapshot()
            try:
                statefile.write_text_atomic(self.path, data)
            except OSError as e:
                self.failures += 1
                now = time.monotonic()
                if now - self._last_warning >= LOG_EVERY:
                    self._last_warning = now
                    log.warning("cannot write %s (%s); runs stay in memory and the write is retried",
                                self.path, e.strerror or e)
                return False
            with self._lock:
                self._written = generation
            return True
