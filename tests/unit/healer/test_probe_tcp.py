"""The TCP probe and the host:port targets every network probe parses."""

from __future__ import annotations

import socket

import pytest
from probe_servers import never_answer, server

from oomguard.healer import probe_tcp


def test_parse_hostport():
    assert probe_tcp.parse_hostport("127.0.0.1:80") == ("127.0.0.1", 80)
    assert probe_tcp.parse_hostport("[::1]:3306") == ("::1", 3306)
    assert probe_tcp.parse_hostport("db", 3306) == ("db", 3306)
    with pytest.raises(ValueError):
        probe_tcp.parse_hostport("db")
    with pytest.raises(ValueError):
        probe_tcp.parse_hostport("db:99999")


def test_tcp_accepting_port_is_healthy():
    with server(never_answer) as s:
        assert probe_tcp.probe_tcp(s.address, 2).ok


def test_tcp_closed_port_is_down():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    r = probe_tcp.probe_tcp(f"127.0.0.1:{port}", 2)
    assert not r.ok
    assert "refused" in r.detail.lower()
