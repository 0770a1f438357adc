"""Fixtures shared by the healer's tests."""

from __future__ import annotations

import http.server
import threading
import time

import pytest
from healer_rig import Procs, Rig

from oomguard.host import cgroups


@pytest.fixture
def http_server():
    """A threaded HTTP server whose paths choose the behaviour."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path.startswith("/hang"):
                time.sleep(60)
                return
            code = 500 if self.path.startswith("/error") else 200
            body = b"ok\n"
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def fake_cgroupfs(tmp_path, monkeypatch):
    """No test touches the host's cgroupfs: the healer sees this tree."""
    root = tmp_path / "cgroupfs"
    (root / "app").mkdir(parents=True)
    monkeypatch.setattr(cgroups, "ROOT", root)
    return root


@pytest.fixture
def rig(tmp_path):
    return Rig(tmp_path)


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.close()
