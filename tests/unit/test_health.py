"""Health checks: each probe kind against real local servers, hung endpoints,
the MySQL greeting (fake and, where installed, a real MariaDB), and the
oom_score_adj that commands start at."""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from oomguard.config import Check
from oomguard.healer import probes as health

# ---------------------------------------------------------------- servers


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


def check(kind: str, target: str, **kw) -> Check:
    return Check(name=kw.pop("name", kind), kind=kind, target=target, **kw)


# ---------------------------------------------------------------- targets


def test_parse_hostport():
    assert health.parse_hostport("127.0.0.1:80") == ("127.0.0.1", 80)
    assert health.parse_hostport("[::1]:3306") == ("::1", 3306)
    assert health.parse_hostport("db", 3306) == ("db", 3306)
    with pytest.raises(ValueError):
        health.parse_hostport("db")
    with pytest.raises(ValueError):
        health.parse_hostport("db:99999")


def test_mysql_address_forms():
    assert health.mysql_address("/run/mysqld/mysqld.sock") == "/run/mysqld/mysqld.sock"
    assert health.mysql_address("unix:/tmp/x.sock") == "/tmp/x.sock"
    assert health.mysql_address("127.0.0.1") == ("127.0.0.1", 3306)
    assert health.mysql_address("127.0.0.1:3307") == ("127.0.0.1", 3307)


# ---------------------------------------------------------------- TCP


def test_tcp_accepting_port_is_healthy():
    with server(never_answer) as s:
        assert health.probe_tcp(s.address, 2).ok


def test_tcp_closed_port_is_down():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    r = health.probe_tcp(f"127.0.0.1:{port}", 2)
    assert not r.ok
    assert "refused" in r.detail.lower()


# ---------------------------------------------------------------- HTTP


def test_http_expected_status(http_server):
    assert health.probe_http(http_server + "/", 2).ok
    r = health.probe_http(http_server + "/error", 2)
    assert not r.ok and "status 500, expected 200" in r.detail
    assert health.probe_http(http_server + "/error", 2, expect_status=500).ok


def test_http_hung_server_times_out(http_server):
    r = health.probe_http(http_server + "/hang", 0.3)
    assert not r.ok
    assert "timed out" in r.detail


def test_http_silent_tcp_server_times_out():
    with server(never_answer) as s:
        r = health.probe_http(f"http://{s.address}/", 0.3)
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
        assert health.probe_http(url, 3, expect_status=204).ok
        assert not health.probe_http(url, 3, expect_status=200).ok
    finally:
        srv.shutdown()
        srv.server_close()


# ---------------------------------------------------------------- MySQL greeting


def test_parse_greeting_protocol_10():
    r = health.parse_mysql_greeting(greeting_packet()[4:])
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
    r = health.parse_mysql_greeting(packet[4:])
    assert not r.ok
    assert text in r.detail


def test_parse_greeting_other_protocol_is_down():
    r = health.parse_mysql_greeting(greeting_packet(proto=9)[4:])
    assert not r.ok and "protocol version 9" in r.detail


def test_fake_mysql_greeting_over_tcp():
    with server(sends(greeting_packet())) as s:
        r = health.probe_mysql(s.address, 2)
    assert r.ok, r.detail


def test_fake_mysql_err_greeting_over_tcp():
    with server(sends(err_packet(1040, b"Too many connections"))) as s:
        r = health.probe_mysql(s.address, 2)
    assert not r.ok and "Too many connections" in r.detail


def test_fake_mysql_greeting_over_unix_socket(tmp_path):
    path = str(tmp_path / "mysqld.sock")
    with server(sends(greeting_packet()), unix_path=path):
        assert health.probe_mysql(path, 2).ok
        assert health.probe_mysql("unix:" + path, 2).ok


def test_fake_mysql_truncated_greeting_is_down():
    with server(sends(greeting_packet()[:10], then_sleep=0)) as s:
        r = health.probe_mysql(s.address, 2)
    assert not r.ok and "closed" in r.detail


def test_mysql_silent_server_times_out():
    with server(never_answer) as s:
        r = health.probe_mysql(s.address, 0.3)
    assert not r.ok and "timed out" in r.detail


# ---------------------------------------------------------------- a real MariaDB


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
        while not (sock.exists() and health.probe_mysql(f"127.0.0.1:{port}", 1).ok):
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
    r = health.probe_mysql(f"127.0.0.1:{mariadb['port']}", 3)
    assert r.ok and "MariaDB" in r.detail
    assert health.probe_mysql(mariadb["socket"], 3).ok


def test_real_mariadb_loopback_probes_never_block_the_host(mariadb):
    # max_connect_errors is 2: greeting-only probes on loopback are exempt.
    for _ in range(5):
        r = health.probe_mysql(f"127.0.0.1:{mariadb['port']}", 3)
        assert r.ok, r.detail


def test_real_mariadb_remote_probes_never_block_the_host(mariadb):
    """Hanging up after the greeting is a handshake error; after
    max_connect_errors (2 here) of them the server answers 1129 "Host blocked".
    On a non-loopback address the probe therefore finishes the handshake."""
    if not mariadb["extra_ip"]:
        pytest.skip("no non-loopback IPv4 address on this host")
    for _ in range(5):
        r = health.probe_mysql(f"{mariadb['extra_ip']}:{mariadb['port']}", 3)
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
        r = health.probe_mysql(f"127.0.0.1:{mariadb['port']}", 3)
        assert not r.ok
        assert "1040" in r.detail and "Too many connections" in r.detail
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 20
    while not health.probe_mysql(f"127.0.0.1:{mariadb['port']}", 3).ok:
        assert time.monotonic() < deadline, "MariaDB did not take connections again"
        time.sleep(0.1)


# ---------------------------------------------------------------- commands


def test_command_exit_status():
    assert health.probe_command(["true"], 5).ok
    r = health.probe_command(["sh", "-c", "echo broken >&2; exit 3"], 5)
    assert not r.ok and "exit 3" in r.detail and "broken" in r.detail


def test_command_not_found_is_down():
    r = health.probe_command(["/nonexistent/oomguard-check"], 5)
    assert not r.ok


def test_command_never_runs_through_a_shell(tmp_path):
    marker = tmp_path / "pwned"
    r = health.probe_command(["echo", f"; touch {marker}"], 5)
    assert r.ok
    assert not marker.exists()


def test_command_killed_at_timeout_with_its_children(tmp_path):
    pidfile = tmp_path / "child.pid"
    r = health.probe_command(["sh", "-c", f"sleep 1000 & echo $! > {pidfile}; wait"], 0.5)
    assert not r.ok and "time-out" in r.detail
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "the check's background child survived"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


ADJ_SCRIPT = textwrap.dedent(
    """
    import shutil, subprocess, sys
    from oomguard.healer import probes as health
    if sys.argv[2] == "no-choom":
        shutil.which = lambda name, *a, **k: None
    out = sys.argv[1]
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("300")  # stands in for the daemon's -1000: raising needs no privilege
    plain = subprocess.run(["cat", "/proc/self/oom_score_adj"], capture_output=True, text=True).stdout.strip()
    r = health.run_command(["sh", "-c", "cat /proc/self/oom_score_adj > " + out], 10)
    print(plain, r.returncode, open(out).read().strip())
    """
)


@pytest.mark.parametrize("mode", ["choom", "no-choom"])
def test_commands_do_not_inherit_the_daemons_oom_score_adj(tmp_path, mode):
    """A parent at 300 (the test cannot lower itself to -1000 without
    CAP_SYS_RESOURCE; any inherited value shows the same thing): a plain child
    inherits 300, a child started by run_command starts at 0."""
    if mode == "choom" and not shutil.which("choom"):
        pytest.skip("choom not installed")
    src = str(Path(health.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=src)
    out = subprocess.run(
        [sys.executable, "-c", ADJ_SCRIPT, str(tmp_path / "adj"), mode],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    plain, rc, child = out.stdout.split()
    assert plain == "300"
    assert rc == "0"
    assert child == "0"


def test_child_argv_uses_choom_without_a_shell():
    if not shutil.which("choom"):
        pytest.skip("choom not installed")
    argv = health.child_argv(["systemctl", "restart", "php8.2-fpm"])
    assert os.path.basename(argv[0]) == "choom"
    assert argv[1:] == ["-n", "0", "--", "systemctl", "restart", "php8.2-fpm"]


def test_restart_style_command_keeps_what_it_started(tmp_path):
    """kill_group=False: a restart that times out loses only its own process,
    not the service it left behind in its process group."""
    pidfile = tmp_path / "svc.pid"
    r = health.run_command(
        ["sh", "-c", f"sleep 1000 & echo $! > {pidfile}; sleep 1000"], 0.5, kill_group=False
    )
    assert r.timed_out
    svc = int(pidfile.read_text())
    try:
        assert _alive(svc)
    finally:
        os.killpg(os.getpgid(svc), signal.SIGKILL)  # the service and the orphaned foreground sleep


# ---------------------------------------------------------------- deadlines


def test_probe_with_deadline_abandons_a_probe_that_ignores_its_timeout():
    release = threading.Event()

    def stubborn(chk, cancel):
        release.wait(60)  # ignores the time-out and the cancel
        return health.ProbeResult(True, "late")

    t0 = time.monotonic()
    r = health.probe_with_deadline(check("command", "x", timeout=0.2), slack=0.2, probe_fn=stubborn)
    elapsed = time.monotonic() - t0
    release.set()
    assert not r.ok and "abandoned" in r.detail
    assert elapsed < 5  # generous: the point is that it did not wait 60 s


def test_monitor_close_kills_the_commands_of_running_probes(tmp_path):
    pidfile = tmp_path / "check.pid"
    chk = check("command", f"sh -c 'echo $$ > {pidfile}; exec sleep 1000'", interval=1, timeout=60)
    m = health.HealthMonitor([chk])
    m.poll(time.monotonic())
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    pid = int(pidfile.read_text())
    assert _alive(pid)
    m.close()
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "a probe's command outlived the monitor"
        time.sleep(0.02)


def test_cancel_wakes_a_blocked_socket_probe():
    with server(never_answer) as s:
        cancel = health.Cancel()
        result = []
        t = threading.Thread(
            target=lambda: result.append(health.probe_mysql(s.address, 30, cancel)), daemon=True
        )
        t.start()
        time.sleep(0.2)
        cancel.cancel()
        t.join(5)
    assert result and not result[0].ok


# ---------------------------------------------------------------- the monitor


class Scripted:
    """A probe function whose answer the test sets."""

    def __init__(self):
        self.up = True
        self.calls = 0

    def __call__(self, chk, cancel):
        self.calls += 1
        return health.ProbeResult(self.up, "up" if self.up else "down")


def test_monitor_counts_consecutive_failures_and_remembers_the_first():
    probe = Scripted()
    m = health.HealthMonitor([check("command", "x", interval=5, failures=3)], probe, threaded=False)
    m.poll(0)
    assert m.healthy() and not m.down()
    probe.up = False
    m.poll(5)
    m.poll(7)  # not due: no probe
    m.poll(10)
    assert not m.down() and not m.healthy()
    m.poll(15)
    assert m.down()
    assert m.down_since() == 5  # the first failing probe, not the one at the threshold
    assert probe.calls == 4
    probe.up = True
    m.poll(20)
    assert m.healthy() and not m.down() and m.down_since() is None


def test_monitor_blip_below_threshold_resets():
    probe = Scripted()
    m = health.HealthMonitor([check("command", "x", interval=1, failures=2)], probe, threaded=False)
    probe.up = False
    m.poll(0)
    probe.up = True
    m.poll(1)
    probe.up = False
    m.poll(2)
    assert not m.down()
    m.poll(3)
    assert m.down() and m.down_since() == 2


def test_monitor_probe_soon_makes_checks_due():
    probe = Scripted()
    m = health.HealthMonitor([check("command", "x", interval=60)], probe, threaded=False)
    m.poll(0)
    m.poll(1)
    assert probe.calls == 1
    m.probe_soon()
    m.poll(2)
    assert probe.calls == 2


def test_monitor_keeps_its_cadence_with_hung_endpoints(http_server, tmp_path):
    """A TCP server that accepts and never answers (MySQL check), an HTTP
    server that hangs, a command that sleeps forever, and a probe that
    ignores every time-out: poll() stays quick, failures keep arriving at
    the checks' cadence, hung threads stay capped."""
    release = threading.Event()

    def probe_fn(chk, cancel):
        if chk.name == "stubborn":
            release.wait(60)
            return health.ProbeResult(True, "late")
        return health.probe(chk, cancel)

    with server(never_answer) as silent:
        checks = [
            check("mysql", silent.address, name="db", interval=0.2, timeout=0.3),
            check("http", http_server + "/hang", name="shop", interval=0.2, timeout=0.3),
            check("command", "sleep 1000", name="cmd", interval=0.2, timeout=0.3),
            check("command", "x", name="stubborn", interval=0.2, timeout=0.2),
        ]
        m = health.HealthMonitor(checks, probe_fn, slack=0.2, max_hung=2)
        start = time.monotonic()
        worst = 0.0
        observations: list[health.Observation] = []
        while time.monotonic() - start < 3.0:
            t0 = time.monotonic()
            observations += m.poll(t0)
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.02)
        release.set()
        m.close()
    assert worst < 0.5, f"poll blocked for {worst:.2f}s"
    for name in ("db", "shop", "cmd", "stubborn"):
        results = [o for o in observations if o.check == name]
        assert len(results) >= 3, (name, results)
        assert not any(o.ok for o in results), name
    assert m.down() and set(m.down_checks()) == {"db", "shop", "cmd", "stubborn"}
    stubborn = [o for o in observations if o.check == "stubborn"]
    assert any(o.abandoned for o in stubborn)
    assert any("still hung" in o.detail for o in stubborn)  # the cap of 2 hung probes held
    assert m.status()["stubborn"]["hung_probes"] <= 2
