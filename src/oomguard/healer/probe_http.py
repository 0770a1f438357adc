"""The HTTP(S) probe: one GET, its status compared with the expected one."""

from __future__ import annotations

import http.client
import ssl
from urllib.parse import urlsplit

from oomguard.healer.probe_base import Cancel, ProbeResult
from oomguard.healer.probe_tcp import connect, describe


def _tls_context() -> ssl.SSLContext:
    # A health check asks "does the shop answer?", not "is its certificate
    # valid?": an expired or self-signed certificate on 127.0.0.1 must not
    # make the healer kill an operator's import.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def probe_http(
    url: str, timeout: float, expect_status: int = 200, cancel: Cancel | None = None
) -> ProbeResult:
    """Healthy when GET ``url`` answers with ``expect_status`` (redirects are
    not followed: the expected status says what counts)."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    try:
        host = parts.hostname or ""
        port = parts.port or (443 if https else 80)
    except ValueError as e:
        return ProbeResult(False, f"bad URL {url!r}: {e}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # The socket (TLS or not) is ours; http.client only speaks HTTP over it.
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        # Connect ourselves so the raw socket is registered with the watchdog
        # before anything can block on it.
        raw = connect((host, port), timeout, cancel)
        if https:
            # wrap_socket takes over the fd; register the TLS socket as well
            raw = _tls_context().wrap_socket(raw, server_hostname=host)
            if cancel:
                cancel.add_socket(raw)
        conn.sock = raw
        conn.request("GET", path, headers={"User-Agent": "oomguard-healer", "Connection": "close"})
        resp = conn.getresponse()
        resp.read(4096)  # enough to see the server finished its answer
        status = resp.status
    except (OSError, ValueError, http.client.HTTPException) as e:
        return ProbeResult(False, f"GET {url}: {describe(e)}")
    finally:
        conn.close()
    if status != expect_status:
        return ProbeResult(False, f"GET {url}: status {status}, expected {expect_status}")
    return ProbeResult(True, f"GET {url}: status {status}")
