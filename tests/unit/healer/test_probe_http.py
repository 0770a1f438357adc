"""The HTTP(S) probe against real loopback servers."""

from __future__ import annotations

import http.server
import shutil
import subprocess
import threading

import pytest
from probe_servers import never_answer, server

from oomguard.healer import probe_http


def test_http_expected_status(http_server):
    assert probe_http.probe_http(http_server + "/", 2).ok
    r = probe_http.probe_http(http_server + "/error", 2)
    assert not r.ok and "status 500, expected 200" in r.detail
    assert probe_http.probe_http(http_server + "/error", 2, expect_status=500).ok


def test_http_hung_server_times_out(http_server):
    r = probe_http.probe_http(http_server + "/hang", 0.3)
    assert not r.ok
    assert "timed out" in r.detail


def test_http_silent_tcp_server_times_out():
    with server(never_answer) as s:
        r = probe_http.probe_http(f"http://{s.address}/", 0.3)
    assert not r.ok and "timed out" in r.detail


def test_https_self_signed_counts_as_up(tmp_path):
    """Availability, not trust: an untrusted certificate must not look like an outage."""
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
         "-days", "1", "-subj", "/CN=shop.invalid"],
        check=True, capture_output=True,
    )  # fmt: skip
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(204)
            self.end_headers()

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        url = f"https://127.0.0.1:{srv.server_address[1]}/"
        assert probe_http.probe_http(url, 3, expect_status=204).ok
        assert not probe_http.probe_http(url, 3, expect_status=200).ok
    finally:
        srv.shutdown()
        srv.server_close()
