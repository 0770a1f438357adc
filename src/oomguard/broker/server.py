"""The broker's socket: one selector loop that accepts, authenticates, parses
and dispatches, and never waits on slow work.

One Unix socket serves every local user. Each connection carries one JSON
request line and gets one JSON reply line (protocol.py). Who the peer is
comes from the kernel (peer.py), never from what it says.

On the loop itself: accepting, the connection caps (per uid and in total),
pinning the peer, reading with a size limit and a deadline, ``ping``, and the
fast half of a ``protect`` grant (grant.py). Everything else leaves the loop:
every other op runs in a small pool that is fair between users and caps each
user's queued work (workers.py; past the cap the reply is BUSY), and a grant
whose placement asks systemd for a scope finishes in a pool of its own,
replying only once the run is placed, so the client never execs before. A
finished job wakes the loop through a pipe, so its reply goes out at once.
"""

from __future__ import annotations

import logging
import os
import queue
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from oomguard.broker.grant import Granter, Pending
from oomguard.broker.peer import Peer, peer_credentials, pin
from oomguard.broker.protocol import (
    MAX_OP,
    MAX_REQUEST,
    Refusal,
    encode,
    flag,
    integer,
    parse_request,
    refused,
)
from oomguard.broker.workers import WorkerPool
from oomguard.config import Config
from oomguard.config.broker import MIN_MEMORY_MAX
from oomguard.host.wakeup import stop_fd
from oomguard.runs.run import BUDGET, Run
from oomguard.telemetry.reasons import RefusalReason

log = logging.getLogger(__name__)

# A handler's result, or the whole reply line already encoded (see the event reader).
Handler = Callable[[Peer, dict], dict | bytes]
INLINE = frozenset({"protect", "ping"})
SWITCH_INTERVAL = 0.001  # seconds; see serve
_WAKE = object()  # the selector key of the wake-up pipe
_STOP = object()  # the stop event's, when it has one: the loop then looks at the event
STOP_CHECK = 0.2  # the longest wait while connections are open, or the stop cannot wake the selector


@dataclass
class _Conn:
    sock: socket.socket
    peer: Peer
    deadline: float
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: memoryview = field(default_factory=lambda: memoryview(b""))
    replied: bool = False


class Broker:
    """The socket server. ``handlers`` answer the ops other than "protect"
    and "ping" (runs, events, status, kill-run, ...), given the
    kernel-verified peer; each runs in the query pool: ``workers`` threads,
    at most ``per_uid`` jobs of one uid queued or running."""

    def __init__(
        self,
        config: Config,
        granter: Granter,
        handlers: dict[str, Handler] | None = None,
        *,
        workers: int = 3,
        per_uid: int = 2,
        placers: int = 2,
    ):
        self.config = config.protect
        self.granter = granter
        self.handlers = dict(handlers or {})
        self.pool = WorkerPool("broker-query", workers, per_uid)
        self.placer = WorkerPool("broker-placement", placers, self.config.max_connections_per_uid)
        self._finished: queue.SimpleQueue[tuple[_Conn, bytes]] = queue.SimpleQueue()
        self.sock: socket.socket | None = None
        self._conns: dict[int, _Conn] = {}
        self._per_uid: dict[int, int] = {}
        self._sel = selectors.DefaultSelector()
        # A socket pair, not a pipe: once closed, a late job's wake-up raises
        # instead of writing to whatever reused the fd number.
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self.ready = threading.Event()

    # ------------------------------------------------------------ lifecycle

    def bind(self) -> None:
        path = Path(self.config.socket)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o755)
        if path.exists() or path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
                raise RuntimeError(f"another daemon is already serving {path}")
            except (ConnectionRefusedError, FileNotFoundError):
                path.unlink(missing_ok=True)
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The allow-list is enforced per connection from SO_PEERCRED; the
        # socket itself must be reachable by every user who may be allowed.
        old = os.umask(0o111)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o666)
        sock.listen(128)
        sock.setblocking(False)
        self.sock = sock
        self._sel.register(sock, selectors.EVENT_READ, None)

    def close(self) -> None:
        self.pool.stop(timeout=1)
        self.placer.stop(timeout=1)
        for conn in list(self._conns.values()):
            self._drop(conn)
        if self.sock is not None:
            self._sel.unregister(self.sock)
            self.sock.close()
            self.sock = None
            try:
                os.unlink(self.config.socket)
            except OSError:
                pass
        if self._wake_r.fileno() >= 0:
            self._sel.unregister(self._wake_r)
            self._wake_r.close()
            self._wake_w.close()

    def serve(self, stop: threading.Event) -> None:
        # Every syscall on the loop gives up the GIL; with pool threads busy
        # it waits up to one switch interval to get it back (5 ms by default).
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        if self.sock is None:
            self.bind()
        wake = stop_fd(stop)
        if wake is not None:
            self._sel.register(wake, selectors.EVENT_READ, _STOP)
        self.ready.set()
        try:
            while not stop.is_set():
                self.step(self.idle_timeout(wake is not None))
        finally:
            if wake is not None:
                self._sel.unregister(wake)
            self.close()

    def idle_timeout(self, stop_wakes: bool) -> float | None:
        """How long one step may wait: until the nearest connection's
        deadline; with no connection, until a new one (or the stop) comes
        when the stop can wake the selector, else STOP_CHECK."""
        if not self._conns:
            return None if stop_wakes else STOP_CHECK
        left = min(c.deadline for c in self._conns.values()) - time.monotonic()
        return min(STOP_CHECK, max(0.0, left))

    def step(self, timeout: float) -> None:
        for key, mask in self._sel.select(timeout):
            if key.data is None:
                self._accept()
                continue
            if key.data is _WAKE:
                self._drain_wake()
                continue
            if key.data is _STOP:
                continue
            conn: _Conn = key.data
            try:
                if mask & selectors.EVENT_READ and not conn.replied:
                    self._read(conn)
                if mask & selectors.EVENT_WRITE:
                    self._flush(conn)
            except Exception:  # noqa: BLE001 - no peer may crash the daemon
                log.exception("broker: dropping connection from pid %d", conn.peer.pid)
                self._drop(conn)
        while not self._finished.empty():
            conn, line = self._finished.get()
            if self._conns.get(conn.sock.fileno()) is conn:
                self._reply(conn, line)
        now = time.monotonic()
        for conn in list(self._conns.values()):
            if now >= conn.deadline:
                if conn.replied:
                    self._drop(conn)
                else:
                    self._reply(conn, refused("request timed out: send one JSON line"))

    # ------------------------------------------------------------ connections

    def _accept(self) -> None:
        assert self.sock is not None
        for _ in range(64):
            try:
                sock, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: keep serving the rest
                log.error("broker: accept failed: %s", e)
                time.sleep(0.05)
                return
            sock.setblocking(False)
            try:
                peer = peer_credentials(sock)
            except OSError:
                sock.close()
                continue
            conn = _Conn(sock, peer, time.monotonic() + self.config.request_timeout)
            if len(self._conns) >= self.config.max_connections:
                self._refuse_now(conn, "the broker is busy: too many connections")
                continue
            if self._per_uid.get(peer.uid, 0) >= self.config.max_connections_per_uid:
                self._refuse_now(conn, f"too many connections from uid {peer.uid}")
                continue
            pin(peer)
            self._conns[sock.fileno()] = conn
            self._per_uid[peer.uid] = self._per_uid.get(peer.uid, 0) + 1
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _refuse_now(self, conn: _Conn, message: str) -> None:
        log.warning("broker: %s (pid %d)", message, conn.peer.pid)
        self._report_busy(conn.peer, message)
        try:
            conn.sock.send(encode(refused(message)))
        except OSError:
            pass
        conn.peer.close()
        conn.sock.close()

    def _report_busy(self, peer: Peer, message: str) -> None:
        try:
            self.granter.on_refusal(peer, RefusalReason.BUSY, message)
        except Exception:  # noqa: BLE001 - a broken event store must not stop the broker
            log.exception("broker: could not record a refusal")

    def _read(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(MAX_REQUEST + 1 - len(conn.inbuf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not chunk:
            self._reply(conn, refused("incomplete request: connection closed before a newline"))
            return
        conn.inbuf += chunk
        if b"\n" in conn.inbuf:
            try:
                request = parse_request(bytes(conn.inbuf.split(b"\n", 1)[0]))
            except Refusal as r:
                self._reply(conn, refused(str(r)))
                return
            self._route(conn, request)
        elif len(conn.inbuf) > MAX_REQUEST:
            self._reply(conn, refused(f"request too large (limit {MAX_REQUEST} bytes)"))

    # ------------------------------------------------------------ dispatch

    def _route(self, conn: _Conn, request: dict) -> None:
        op = request["op"]
        if op == "protect":
            self._protect(conn, request)
        elif op in INLINE or op not in self.handlers:
            self._reply(conn, self.dispatch(conn.peer, request))
        elif not self._defer(self.pool, conn, lambda: self.dispatch(conn.peer, request)):
            message = f"the broker is busy: uid {conn.peer.uid} already has {self.pool.per_uid} requests under way"
            self._report_busy(conn.peer, message)
            self._reply(conn, refused(message))

    def _protect(self, conn: _Conn, request: dict) -> None:
        """The grant's fast half here; a slow placement in the placement pool."""
        try:
            started = self.granter.start(conn.peer, **_check_protect(request))
        except Refusal as r:
            self._reply(conn, refused(str(r)))
            return
        if isinstance(started, Pending) and started.slow:
            if not self._defer(self.placer, conn, lambda: self._finish(started)):
                self.granter.cancel(started)
                self._reply(conn, refused("the broker is busy: too many grants under way"))
            return
        self._reply(conn, self._finish(started) if isinstance(started, Pending) else _granted(started))

    def _finish(self, pending: Pending) -> dict:
        try:
            return _granted(self.granter.finish(pending))
        except Refusal as r:
            return refused(str(r))

    def handle(self, peer: Peer, line: bytes) -> dict | bytes:
        """One request line from a kernel-identified peer to one reply."""
        try:
            request = parse_request(line)
        except Refusal as r:
            return refused(str(r))
        return self.dispatch(peer, request)

    def dispatch(self, peer: Peer, request: dict) -> dict | bytes:
        """A parsed request (one with an "op") to its reply, on this thread."""
        op = request["op"]
        if op == "protect":
            try:
                return _granted(self.granter.grant(peer, **_check_protect(request)))
            except Refusal as r:
                return refused(str(r))
        if op == "ping":
            return {"ok": True, "uid": peer.uid}
        handler = self.handlers.get(op)
        if handler is None:
            return refused(f"unknown op {op[:MAX_OP]!r}")
        try:
            result = handler(peer, request)
        except Refusal as r:
            return refused(str(r))
        except Exception as e:  # noqa: BLE001
            log.exception("broker: op %r failed", op)
            return refused(f"internal error: {e.__class__.__name__}")
        return result if isinstance(result, bytes) else {"ok": True, **result}

    def _defer(self, pool: WorkerPool, conn: _Conn, work: Callable[[], dict | bytes]) -> bool:
        """Run ``work`` off the loop; its reply goes out when it is done."""

        def job() -> bytes:
            try:
                reply = work()
                return reply if isinstance(reply, bytes) else encode(reply)  # encoded here, not on the loop
            except Exception as e:  # noqa: BLE001
                log.exception("broker: a deferred op failed")
                return encode(refused(f"internal error: {e.__class__.__name__}"))

        def deliver(line: object) -> None:
            self._finished.put((conn, line))  # type: ignore[arg-type]
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass  # wake-ups pending already, or the broker closed

        if not pool.submit(conn.peer.uid, job, deliver):
            return False
        conn.replied = True  # no more reading, and no timeout while it works
        conn.deadline = float("inf")
        self._sel.unregister(conn.sock)
        return True

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    # ------------------------------------------------------------ replies

    def _reply(self, conn: _Conn, reply: dict | bytes) -> None:
        conn.replied = True
        conn.outbuf = memoryview(reply if isinstance(reply, bytes) else encode(reply))
        conn.deadline = time.monotonic() + self.config.request_timeout
        try:
            self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        except KeyError:  # unregistered while a deferred op ran
            self._sel.register(conn.sock, selectors.EVENT_WRITE, conn)
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        conn.outbuf = conn.outbuf[sent:]
        if not conn.outbuf:
            self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if self._conns.get(fd) is conn:
            del self._conns[fd]
            self._per_uid[conn.peer.uid] -= 1
            if not self._per_uid[conn.peer.uid]:
                del self._per_uid[conn.peer.uid]
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.peer.close()
        conn.sock.close()


def _check_protect(request: dict) -> dict:
    """The grant's options: ``report`` (the run's summary to its terminal at
    its end) and ``memory_max`` (its budget in bytes, or None)."""
    integer(request, "v", 0, 1 << 16, 1, "protect: v must be a small integer (the protocol version)")
    budget = integer(request, "memory_max", MIN_MEMORY_MAX, 1 << 60, None,
                     "protect: memory_max must be a number of bytes, at least 1 MiB")  # fmt: skip
    return {"report": flag(request, "report"), "memory_max": budget}


def _granted(run: Run) -> dict:
    reply = {"ok": True, "run": run.id, "cgroup": run.cgroup}
    if run.extra.get(BUDGET) is not None:
        reply["memory_max"] = run.extra[BUDGET]
    return reply
