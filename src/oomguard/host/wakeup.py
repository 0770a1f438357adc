"""A stop event that a poll() or select() can wait on, so that an idle loop
blocks on its file descriptors alone instead of waking on a short timeout
just to look at the event.

``StopEvent`` is a ``threading.Event`` (``wait``, ``is_set`` as ever) whose
``set`` also makes ``fileno()`` readable. ``stop_fd(stop)`` is that file
descriptor, or None for a plain ``threading.Event`` (tests pass one), in
which case a loop keeps its short timeout.
"""

from __future__ import annotations

import os
import threading


class StopEvent(threading.Event):
    """Set once, never cleared: ``clear`` is refused, since the pipe would
    stay readable and busy-loop every waiter."""

    def __init__(self) -> None:
        super().__init__()
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._r

    def set(self) -> None:
        super().set()
        try:
            os.write(self._w, b"\0")
        except (BlockingIOError, OSError):
            pass  # already readable, or closed at exit: either way waiters see is_set()

    def clear(self) -> None:
        raise RuntimeError("a StopEvent cannot be cleared")


def stop_fd(stop: threading.Event) -> int | None:
    """The descriptor that becomes readable when ``stop`` is set, if it has one."""
    return stop.fileno() if isinstance(stop, StopEvent) else None
