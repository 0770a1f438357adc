"""What every health probe shares: its result, and the cancellation through
which a watchdog aborts it at its deadline."""

from __future__ import annotations

import os
import signal
import socket
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str


class Cancel:
    """Lets a watchdog abort a probe at its deadline.

    Sockets are shut down (which wakes a thread blocked in recv/connect on
    them) and registered process groups are SIGKILLed. Thread-safe; things
    registered after cancellation are aborted at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._pgids: list[int] = []
        self.cancelled = False

    def add_socket(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock)
            if not self.cancelled:
                return
        _shutdown(sock)

    def add_process_group(self, pgid: int) -> None:
        with self._lock:
            self._pgids.append(pgid)
            if not self.cancelled:
                return
        kill_process_group(pgid)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            socks, pgids = list(self._socks), list(self._pgids)
        for s in socks:
            _shutdown(s)
        for g in pgids:
            kill_process_group(g)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def kill_process_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
