"""The MySQL/MariaDB probe: the server's greeting, without credentials."""

from __future__ import annotations

import ipaddress
import socket

from oomguard.healer.probe_base import Cancel, ProbeResult
from oomguard.healer.probe_tcp import connect, describe, parse_hostport

MYSQL_PROTOCOL = 10
MYSQL_DEFAULT_PORT = 3306
_GREETING_MAX = 64 * 1024  # a real greeting is ~100 bytes


def parse_mysql_greeting(payload: bytes) -> ProbeResult:
    """The first packet a MySQL/MariaDB server sends: a protocol-10 handshake
    (healthy) or an ERR packet such as 1040 "Too many connections" or 1129
    "Host ... is blocked" (down)."""
    if not payload:
        return ProbeResult(False, "empty greeting")
    if payload[0] == 0xFF:
        code = int.from_bytes(payload[1:3], "little") if len(payload) >= 3 else 0
        rest = payload[3:]
        if rest[:1] == b"#":  # optional SQL state marker
            rest = rest[6:]
        message = rest.decode("utf-8", "replace").strip()
        return ProbeResult(False, f"server refused: ERR {code}: {message}")
    if payload[0] != MYSQL_PROTOCOL:
        return ProbeResult(False, f"unexpected protocol version {payload[0]}")
    version = payload[1:].split(b"\0", 1)[0].decode("utf-8", "replace")
    return ProbeResult(True, f"protocol 10, server {version}")


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed before the packet was complete")
        buf += chunk
    return bytes(buf)


def _read_packet(sock: socket.socket) -> tuple[int, bytes]:
    """(sequence id, payload) of one MySQL protocol packet."""
    header = _recv_exactly(sock, 4)
    length = int.from_bytes(header[:3], "little")
    if length == 0 or length > _GREETING_MAX:
        raise ValueError(f"implausible packet length {length}")
    return header[3], _recv_exactly(sock, length)


def _packet(seq: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([seq & 0xFF]) + payload


def mysql_address(target: str) -> tuple[str, int] | str:
    """A Unix socket path ("/run/mysqld/mysqld.sock", "unix:/path") or host:port
    (port 3306 if left out)."""
    if target.startswith("unix:"):
        return target[5:]
    if target.startswith("/"):
        return target
    return parse_hostport(target, MYSQL_DEFAULT_PORT)


# CLIENT_LONG_PASSWORD | LONG_FLAG | PROTOCOL_41 | TRANSACTIONS | SECURE_CONNECTION
# | MULTI_RESULTS | PLUGIN_AUTH
_CLIENT_CAPS = 0x1 | 0x4 | 0x200 | 0x2000 | 0x8000 | 0x20000 | 0x80000
PROBE_USER = b"oomguard-healthcheck"
ER_CON_COUNT_ERROR = 1040


def _finish_handshake(sock: socket.socket, seq: int) -> ProbeResult | None:
    """Answer the greeting with a password-less login as PROBE_USER.

    A client that hangs up after the greeting is a *handshake error*, and the
    server blocks a (non-loopback) host after max_connect_errors of them
    (default 100: eight minutes of 5 s probes) with ERR 1129 "Host is
    blocked". A refused login is an *authentication* error, which never
    blocks. So on remote TCP the probe completes the handshake; the refusal
    is expected and harmless. The one reply that means "down" here is 1040
    "Too many connections", which MariaDB sends after authentication to
    non-SUPER users once max_connections is reached."""
    login = (
        _CLIENT_CAPS.to_bytes(4, "little")
        + (1 << 24).to_bytes(4, "little")
        + bytes([33])  # utf8
        + bytes(23)
        + PROBE_USER
        + b"\0"
        + b"\0"  # empty auth response
        + b"mysql_native_password\0"
    )
    sock.sendall(_packet(seq + 1, login))
    rseq, reply = _read_packet(sock)
    if reply[:1] == b"\xfe":  # auth switch request: answer it with empty data once
        sock.sendall(_packet(rseq + 1, b""))
        rseq, reply = _read_packet(sock)
    if reply[:1] == b"\x00":  # logged in (e.g. --skip-grant-tables): say goodbye
        sock.sendall(_packet(0, b"\x01"))  # COM_QUIT
    elif reply[:1] == b"\xff" and int.from_bytes(reply[1:3], "little") == ER_CON_COUNT_ERROR:
        return parse_mysql_greeting(reply)
    return None


def _is_loopback(sock: socket.socket) -> bool:
    if sock.family == socket.AF_UNIX:
        return True
    try:
        return ipaddress.ip_address(sock.getpeername()[0]).is_loopback
    except (OSError, ValueError):
        return False


def probe_mysql(target: str, timeout: float, cancel: Cancel | None = None) -> ProbeResult:
    """Healthy when the server's initial handshake packet is protocol 10; an
    ERR packet instead (1040 "Too many connections", 1129 "Host blocked", ...)
    is down. No credentials are needed.

    On a Unix socket or a loopback address only the greeting is read (the
    server exempts those from its host cache, so hanging up is harmless);
    elsewhere the handshake is completed, see _finish_handshake."""
    try:
        addr = mysql_address(target)
        sock = connect(addr, timeout, cancel)
    except (OSError, ValueError) as e:
        return ProbeResult(False, f"connect {target}: {describe(e)}")
    try:
        seq, payload = _read_packet(sock)
        result = parse_mysql_greeting(payload)
        if result.ok and not _is_loopback(sock):
            try:
                refused = _finish_handshake(sock, seq)
            except (OSError, ValueError):
                refused = None  # the greeting already proved the server answers
            if refused is not None:
                return refused
        return result
    except (OSError, ValueError) as e:
        return ProbeResult(False, f"greeting from {target}: {describe(e)}")
    finally:
        sock.close()
