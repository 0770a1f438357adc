"""One hook's bounded queue and the thread that drains it."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

LOG_EVERY = 60.0
_STOP = object()


class HookWorker:
    """Calls ``deliver(event, stopping)`` for each submitted event, in order,
    on its own thread. ``submit`` never blocks: a full queue drops the event
    and counts it. ``deliver`` should return soon after ``stopping`` is set."""

    def __init__(
        self, name: str, deliver: Callable[[dict[str, Any], threading.Event], None], maxsize: int
    ):
        self.name = name
        self.dropped = 0
        self.delivered = 0
        self.failed = 0
        self._deliver = deliver
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=maxsize)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"hook-{name}", daemon=True)
        self._last_log = float("-inf")

    def start(self) -> None:
        self._thread.start()

    def submit(self, event: dict[str, Any]) -> bool:
        try:
            self._queue.put_nowait(event)
            return True
        except queue.Full:
            self.dropped += 1
            self.warn("queue full: dropped a %s event (%d so far)", event.get("kind"), self.dropped)
            return False

    def idle(self, timeout: float | None = None) -> bool:
        """Wait until every event submitted so far is handled."""
        q = self._queue
        with q.all_tasks_done:
            return q.all_tasks_done.wait_for(lambda: q.unfinished_tasks == 0, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            pass
        if self._thread.is_alive():
            self._thread.join(timeout)

    def warn(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY:
            self._last_log = now
            log.warning("hook %s: " + msg, self.name, *args)

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            try:
                if event is _STOP or self._stopping.is_set():
                    if event is _STOP:
                        return
                    continue
                try:
                    self._deliver(event, self._stopping)
                    self.delivered += 1
                except Exception as e:  # noqa: BLE001 - a hook's failure stays the hook's
                    self.failed += 1
                    self.warn("%s event not delivered: %s", event.get("kind"), e)
            finally:
                self._queue.task_done()
