"""The TCP probe, and the connecting every network probe does: targets parsed,
sockets registered with the watchdog before anything can block on them."""

from __future__ import annotations

import socket
import ssl

from oomguard.healer.probe_base import Cancel, ProbeResult


def parse_hostport(target: str, default_port: int | None = None) -> tuple[str, int]:
    """("host", port) from "host:port", "[v6]:port" or, with a default, "host"."""
    host, port = target, None
    if target.startswith("["):
        end = target.find("]")
        if end < 0:
            raise ValueError(f"bad address {target!r}")
        host, rest = target[1:end], target[end + 1 :]
        if rest.startswith(":"):
            port = rest[1:]
    elif target.count(":") == 1:
        host, port = target.split(":")
    if port is None:
        if default_port is None:
            raise ValueError(f"expected host:port, got {target!r}")
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {target!r}")
    return host, int(port)


def connect(target: tuple[str, int] | str, timeout: float, cancel: Cancel | None) -> socket.socket:
    """A connected socket (TCP, or Unix for a path) with ``timeout`` on every
    operation, registered with ``cancel`` before the connect can block."""
    if isinstance(target, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        if cancel:
            cancel.add_socket(sock)
        try:
            sock.connect(target)
        except BaseException:
            sock.close()
            raise
        return sock
    host, port = target
    err: OSError | None = None
    # getaddrinfo itself cannot be timed out; the watchdog abandons it.
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        if cancel:
            cancel.add_socket(sock)
        try:
            sock.connect(addr)
            return sock
        except OSError as e:
            err = e
            sock.close()
    raise err or OSError(f"no address for {host}")


def describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(e, ssl.SSLError):
        return f"TLS error: {e.reason or e}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or e.__class__.__name__


def probe_tcp(target: str, timeout: float, cancel: Cancel | None = None) -> ProbeResult:
    """Healthy when a TCP connection to host:port is accepted."""
    try:
        sock = connect(parse_hostport(target), timeout, cancel)
    except (OSError, ValueError) as e:
        return ProbeResult(False, f"connect {target}: {describe(e)}")
    sock.close()
    return ProbeResult(True, f"connected to {target}")
