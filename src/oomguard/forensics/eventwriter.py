"""Events written off the caller's thread, through a bounded queue.

The broker and the enforcer report events from threads that serve users; a
database that is locked by another process, or a full disk, must never make
them wait or fail. ``EventWriter.submit`` only enqueues (stamping the time of
the event); one writer thread commits, and on a storage error keeps the event,
logs at most once a minute, and retries with backoff. When the queue is full
the newest event is dropped and counted, so memory stays bounded.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from oomguard.forensics.events import EventStore

log = logging.getLogger(__name__)

RETRY_MIN = 0.1
RETRY_MAX = 5.0
LOG_EVERY = 60.0


@dataclass(frozen=True)
class _Pending:
    kind: str
    data: Mapping[str, Any]
    uids: tuple[int, ...]
    ts: float


_STOP = object()


class EventWriter:
    """Owns the writes of submitted events to ``store``."""

    def __init__(
        self,
        store: EventStore,
        *,
        maxsize: int = 10_000,
        on_drop: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.dropped = 0
        self.failures = 0
        self._on_drop = on_drop
        self._clock = clock
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=maxsize)
        self._thread: threading.Thread | None = None
        self._last_log = float("-inf")
        self._stopping = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="event-writer", daemon=True)
        self._thread.start()

    def submit(self, kind: str, data: Mapping[str, Any], uids: Iterable[int] = ()) -> bool:
        """Queue one event; never blocks. False when it was dropped."""
        item = _Pending(kind, dict(data), tuple(uids), self._clock())
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop(kind)
            self._log_limited(
                "event queue full: dropped a %s event (%d dropped so far)", kind, self.dropped
            )
            return False
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event submitted so far is written; False on timeout."""
        q = self._queue
        with q.all_tasks_done:
            return q.all_tasks_done.wait_for(lambda: q.unfinished_tasks == 0, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued (for at most ``timeout`` s), then end the thread."""
        if self._thread is None:
            return
        self.flush(timeout)
        self._stopping.set()
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def pending(self) -> int:
        return self._queue.qsize()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                self._write(item)
            finally:
                self._queue.task_done()

    def _write(self, item: _Pending) -> None:
        delay = RETRY_MIN
        while True:
            try:
                self.store.add(item.kind, item.data, ts=item.ts, uids=item.uids)
                return
            except (sqlite3.Error, OSError) as e:
                self.failures += 1
                self._log_limited("cannot write a %s event, will retry: %s", item.kind, e)
                if self._stopping.wait(delay):
                    log.error("event writer stopping: a %s event was not written", item.kind)
                    return
                delay = min(delay * 2, RETRY_MAX)

    def _log_limited(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY:
            self._last_log = now
            log.warning(msg, *args)
