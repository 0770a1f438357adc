"""The MySQL greeting probe: parsed packets, a fake server and, where installed, a real MariaDB."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest
from probe_servers import err_packet, greeting_packet, never_answer, sends, server

from oomguard.healer import probe_mysql


def test_mysql_address_forms():
    assert probe_mysql.mysql_address("/run/mysqld/mysqld.sock") == "/run/mysqld/mysqld.sock"
    assert probe_mysql.mysql_address("unix:/tmp/x.sock") == "/tmp/x.sock"
    assert probe_mysql.mysql_address("127.0.0.1") == ("127.0.0.1", 3306)
    assert probe_mysql.mysql_address("127.0.0.1:3307") == ("127.0.0.1", 3307)


def test_parse_greeting_protocol_10():
    r = probe_mysql.parse_mysql_greeting(greeting_packet()[4:])
    assert r.ok and "10.11.6-MariaDB" in r.detail


@pytest.mark.parametrize(
    "packet, text",
    [
        (err_packet(1040, b"Too many connections"), "ERR 1040: Too many connections"),
        (
            err_packet(
                1129, b"Host '10.0.0.9' is blocked because of many connection errors", b"HY000"
            ),
            "ERR 1129: Host '10.0.0.9' is blocked",
        ),
    ],
)
def test_parse_greeting_err_is_down(packet, text):
    r = probe_mysql.parse_mysql_greeting(packet[4:])
    assert not r.ok
    assert text in r.detail


def test_parse_greeting_other_protocol_is_down():
    r = probe_mysql.parse_mysql_greeting(greeting_packet(proto=9)[4:])
    assert not r.ok and "protocol version 9" in r.detail


def test_fake_mysql_greeting_over_tcp():
    with server(sends(greeting_packet())) as s:
        r = probe_mysql.probe_mysql(s.address, 2)
    assert r.ok, r.detail


def test_fake_mysql_err_greeting_over_tcp():
    with server(sends(err_packet(1040, b"Too many connections"))) as s:
        r = probe_mysql.probe_mysql(s.address, 2)
    assert not r.ok and "Too many connections" in r.detail


def test_fake_mysql_greeting_over_unix_socket(tmp_path):
    path = str(tmp_path / "mysqld.sock")
    with server(sends(greeting_packet()), unix_path=path):
        assert probe_mysql.probe_mysql(path, 2).ok
        assert probe_mysql.probe_mysql("unix:" + path, 2).ok


def test_fake_mysql_truncated_greeting_is_down():
    with server(sends(greeting_packet()[:10], then_sleep=0)) as s:
        r = probe_mysql.probe_mysql(s.address, 2)
    assert not r.ok and "closed" in r.detail


def test_mysql_silent_server_times_out():
    with server(never_answer) as s:
        r = probe_mysql.probe_mysql(s.address, 0.3)
    assert not r.ok and "timed out" in r.detail


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _non_loopback_ipv4() -> str | None:
    try:
        out = subprocess.run(
            ["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True
        ).stdout
    except OSError:
        return None
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            return parts[parts.index("inet") + 1].split("/")[0]
    return None


@pytest.fixture(scope="module")
def mariadb(tmp_path_factory):
    """A real mariadbd in a temp dir: TCP on loopback (and on a non-loopback
    address where the host has one), plus a Unix socket."""
    install, server_bin = (
        shutil.which("mariadb-install-db"),
        shutil.which("mariadbd")
        or ("/usr/sbin/mariadbd" if os.path.exists("/usr/sbin/mariadbd") else None),
    )
    if not install or not server_bin:
        pytest.skip("MariaDB is not installed")
    base = tmp_path_factory.mktemp("mariadb")
    data, sock = base / "data", base / "mysqld.sock"
    r = subprocess.run(
        [install, "--no-defaults", "--user=root", f"--datadir={data}", "--auth-root-authentication-method=normal",
         "--skip-test-db", "--skip-name-resolve"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"mariadb-install-db failed: {r.stderr[-500:]}")
    port = _free_port()
    extra_ip = _non_loopback_ipv4()
    bind = "127.0.0.1" + (f",{extra_ip}" if extra_ip else "")
    log = open(base / "server.log", "wb")
    proc = subprocess.Popen(
        [server_bin, "--no-defaults", "--user=root", f"--datadir={data}", f"--socket={sock}", f"--port={port}",
         f"--bind-address={bind}", "--skip-grant-tables", "--innodb-buffer-pool-size=32M",
         "--performance-schema=OFF", "--max-connections=10", "--max-connect-errors=2"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (sock.exists() and probe_mysql.probe_mysql(f"127.0.0.1:{port}", 1).ok):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip("mariadbd did not start: " + (base / "server.log").read_text()[-800:])
            time.sleep(0.2)
        yield {"port": port, "socket": str(sock), "extra_ip": extra_ip}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_real_mariadb_greeting_tcp_and_unix(mariadb):
    r = probe_mysql.probe_mysql(f"127.0.0.1:{mariadb['port']}", 3)
    assert r.ok and "MariaDB" in r.detail
    assert probe_mysql.probe_mysql(mariadb["socket"], 3).ok


def test_real_mariadb_loopback_probes_never_block_the_host(mariadb):
    # max_connect_errors is 2: greeting-only probes on loopback are exempt.
    for _ in range(5):
        r = probe_mysql.probe_mysql(f"127.0.0.1:{mariadb['port']}", 3)
        assert r.ok, r.detail


def test_real_mariadb_remote_probes_never_block_the_host(mariadb):
    """Hanging up after the greeting is a handshake error; after
    max_connect_errors (2 here) of them the server answers 1129 "Host blocked".
    On a non-loopback address the probe therefore finishes the handshake."""
    if not mariadb["extra_ip"]:
        pytest.skip("no non-loopback IPv4 address on this host")
    for _ in range(5):
        r = probe_mysql.probe_mysql(f"{mariadb['extra_ip']}:{mariadb['port']}", 3)
        assert r.ok, r.detail


def test_real_mariadb_too_many_connections_is_down(mariadb):
    addr = ("127.0.0.1", mariadb["port"])
    held = []
    try:
        # max_connections=10 plus the one spare slot MariaDB keeps
        for _ in range(11):
            s = socket.create_connection(addr, 3)
            s.recv(4096)
            held.append(s)
        r = probe_mysql.probe_mysql(f"127.0.0.1:{mariadb['port']}", 3)
        assert not r.ok
        assert "1040" in r.detail and "Too many connections" in r.detail
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 20
    while not probe_mysql.probe_mysql(f"127.0.0.1:{mariadb['port']}", 3).ok:
        assert time.monotonic() < deadline, "MariaDB did not take connections again"
        time.sleep(0.1)
