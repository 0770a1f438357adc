"""Loopback servers and packets for the probe tests: a TCP or Unix server
that runs a handler per connection, MySQL greeting and ERR packets, and a
check built from its kind and target."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from oomguard.config import Check


class _Server:
    """A loopback TCP (or Unix) server that runs ``handler(conn)`` per connection."""

    def __init__(self, handler, unix_path: str | None = None, backlog: int = 16):
        if unix_path:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(unix_path)
            self.address = unix_path
        else:
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
            self.port = self.sock.getsockname()[1]
            self.address = f"127.0.0.1:{self.port}"
        self.sock.listen(backlog)
        self.handler = handler
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.handler(conn)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()
        for c in self.conns:
            c.close()


@contextlib.contextmanager
def server(handler, **kw):
    s = _Server(handler, **kw)
    try:
        yield s
    finally:
        s.close()


def never_answer(conn: socket.socket) -> None:
    """Accept, then hold the connection without a byte."""
    time.sleep(60)


def greeting_packet(version: bytes = b"10.11.6-MariaDB", proto: int = 10) -> bytes:
    payload = (
        bytes([proto])
        + version
        + b"\0"
        + (1234).to_bytes(4, "little")
        + b"abcdefgh\0"
        + b"\xff\xf7"
    )
    return len(payload).to_bytes(3, "little") + b"\0" + payload


def err_packet(code: int, message: bytes, sqlstate: bytes | None = None) -> bytes:
    payload = (
        b"\xff" + code.to_bytes(2, "little") + (b"#" + sqlstate if sqlstate else b"") + message
    )
    return len(payload).to_bytes(3, "little") + b"\0" + payload


def sends(data: bytes, then_sleep: float = 5.0):
    def handler(conn: socket.socket) -> None:
        conn.sendall(data)
        time.sleep(then_sleep)
        conn.close()

    return handler


def check(kind: str, target: str, **kw) -> Check:
    return Check(name=kw.pop("name", kind), kind=kind, target=target, **kw)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
