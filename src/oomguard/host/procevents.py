"""The kernel's process events: fork, exec, uid change and exit.

The process-event connector (netlink NETLINK_CONNECTOR, CN_IDX_PROC) tells
root about every fork and exec as it happens, which is how the daemon gives
a new php-fpm worker its policy value within milliseconds, places an app
user's new process in the app cgroup at birth, and learns the exit status of
a protected command that nobody waits for (oom-protect execs it).

Only processes are reported (threads are filtered out). When the kernel
drops events (ENOBUFS), a ("lost",) event tells the caller to resync.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

from oomguard.host.wakeup import stop_fd

log = logging.getLogger(__name__)

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
NLMSG_DONE = 3
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2

PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_UID = 0x00000004
PROC_EVENT_EXIT = 0x80000000

_NLMSGHDR = struct.Struct("=IHHII")
_CN_MSG = struct.Struct("=IIIIHH")
_EVENT_HDR = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_HEADERS = _NLMSGHDR.size + _CN_MSG.size

Event = tuple  # ("fork", parent, child) | ("exec", pid) | ("exit", pid, status) | ("uid", pid, ruid, euid) | ("lost",)


def subscription(op: int = PROC_CN_MCAST_LISTEN) -> bytes:
    payload = struct.pack("=I", op)
    cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0)
    body = cn + payload
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), NLMSG_DONE, 0, 0, os.getpid()) + body


def parse(datagram: bytes) -> list[Event]:
    """Decode one netlink datagram into process events (threads dropped)."""
    out: list[Event] = []
    offset = 0
    while offset + _HEADERS + _EVENT_HDR.size <= len(datagram):
        length = _NLMSGHDR.unpack_from(datagram, offset)[0]
        if length < _HEADERS:
            break
        base = offset + _HEADERS
        what = _EVENT_HDR.unpack_from(datagram, base)[0]
        data = base + _EVENT_HDR.size
        end = offset + length
        if what == PROC_EVENT_FORK and data + 16 <= end:
            _ppid, ptgid, cpid, ctgid = struct.unpack_from("=4I", datagram, data)
            if cpid == ctgid:
                out.append(("fork", ptgid, ctgid))
        elif what == PROC_EVENT_EXEC and data + 8 <= end:
            pid, tgid = struct.unpack_from("=2I", datagram, data)
            if pid == tgid:
                out.append(("exec", tgid))
        elif what == PROC_EVENT_EXIT and data + 16 <= end:
            pid, tgid, code, _sig = struct.unpack_from("=4I", datagram, data)
            if pid == tgid:
                out.append(("exit", tgid, code))
        elif what == PROC_EVENT_UID and data + 16 <= end:
            pid, tgid, ruid, euid = struct.unpack_from("=4I", datagram, data)
            if pid == tgid:
                out.append(("uid", tgid, ruid, euid))
        offset += (length + 3) & ~3
    return out


class ProcEvents:
    """A subscription to the connector. ``open()`` raises OSError when events
    are unavailable (not root, no connector in the kernel): poll instead."""

    def __init__(self, rcvbuf: int = 4 << 20):
        self.rcvbuf = rcvbuf
        self.sock: socket.socket | None = None

    def open(self) -> None:
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_CONNECTOR
        )
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, 33, self.rcvbuf)  # SO_RCVBUFFORCE
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.bind((0, CN_IDX_PROC))
            sock.send(subscription())
        except OSError:
            sock.close()
            raise
        self.sock = sock

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.send(subscription(PROC_CN_MCAST_IGNORE))
            except OSError:
                pass
            self.sock.close()
            self.sock = None

    def run(self, callback: Callable[[Event], None], stop: threading.Event) -> None:
        """Deliver events to ``callback`` until ``stop`` is set. A callback
        that raises is logged; the stream goes on. After a loss, ("lost",)
        is delivered at once, again once the backlog is drained, and every
        ``LossTracker.MID_STORM`` seconds while it is not."""
        if self.sock is None:
            self.open()
        assert self.sock is not None
        losses = LossTracker()

        def deliver(events: list[Event]) -> None:
            for ev in events:
                try:
                    callback(ev)
                except Exception:  # noqa: BLE001 - one bad event must not end the stream
                    log.exception("process event handler failed on %r", ev)

        wake = stop_fd(stop)
        # Idle, it blocks on the socket and the stop event alone; a plain
        # Event (tests) is looked at every IDLE_WAIT instead.
        idle_wait = IDLE_WAIT if wake is None else None
        watched = [self.sock] if wake is None else [self.sock, wake]
        try:
            while not stop.is_set():
                timeout = idle_wait if losses.due is None else DRAIN_WAIT
                ready = select.select(watched, [], [], timeout)[0]
                if self.sock not in ready:
                    if not ready and losses.drained(time.monotonic()):
                        deliver([("lost",)])
                    continue
                events, datagrams = self._drain(losses)
                if losses.mid_storm(time.monotonic()):
                    events.append(("lost",))
                deliver(events)
                if datagrams > 1:
                    # A burst (an exec storm): let the next datagrams gather and
                    # read them with one wakeup, not a select() per event.
                    stop.wait(COALESCE)
        finally:
            self.close()

    def _drain(self, losses: LossTracker) -> tuple[list[Event], int]:
        """What the socket holds now, up to MAX_BURST datagrams, without
        blocking; a loss becomes a ("lost",) in its place in the stream."""
        assert self.sock is not None
        events: list[Event] = []
        n = 0
        for _ in range(MAX_BURST):
            try:
                datagram = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    if losses.overrun(time.monotonic()):
                        log.warning("process events lost (receive buffer overrun); resyncing")
                        events.append(("lost",))
                    continue
                if e.errno == errno.EINTR:
                    continue
                raise
            n += 1
            events.extend(parse(datagram))
        return events, n


IDLE_WAIT = 1.0  # nothing to read: the wait only bounds how late ``stop`` is seen
DRAIN_WAIT = 0.05  # no datagram for this long after a loss: the backlog is drained
MAX_BURST = 512  # datagrams read per wakeup at most, so that stop is seen
COALESCE = 0.01  # after a burst, the wait for the next datagrams to gather


class LossTracker:
    """When to tell the consumer to resync after lost events.

    The socket stays congested after the first ENOBUFS and drops more until
    its queue drains, so a resync run mid-backlog misses what was lost after
    it. So there is one resync at the loss, the one that counts after the
    queue is found empty, and while a storm keeps it full one every
    ``MID_STORM`` s."""

    MID_STORM = 1.0

    def __init__(self) -> None:
        self.due: float | None = None  # first loss not yet followed by a drained resync
        self._last: float | None = None  # last resync delivered

    def overrun(self, now: float) -> bool:
        """A loss; True if it starts a new episode (resync now, and log)."""
        fresh = self.due is None
        if fresh:
            self.due = self._last = now
        return fresh

    def mid_storm(self, now: float) -> bool:
        if self.due is None:
            return False
        if self._last is None or now - self._last >= self.MID_STORM:
            self._last = now
            return True
        return False

    def drained(self, now: float) -> bool:
        if self.due is None:
            return False
        self.due = None
        self._last = now
        return True


def available() -> bool:
    """Whether this process may subscribe (root on a kernel with the connector)."""
    pe = ProcEvents()
    try:
        pe.open()
    except OSError:
        return False
    pe.close()
    return True
