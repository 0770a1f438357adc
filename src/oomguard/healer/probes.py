"""Health checks for the auto-healer: HTTP(S), TCP, the MySQL greeting, commands.

A probe answers one question, "does this endpoint work right now?", within
its time-out. The HealthMonitor runs each check at its own interval and
counts consecutive failures; it never waits on a probe:

* every probe has its own socket or process time-out, and
* it runs in a thread of its own with a watchdog deadline (time-out plus a
  little slack). At the deadline the monitor shuts the probe's sockets and
  kills its process group, records a failure, and *abandons* the thread.
  Some waits cannot be interrupted at all (getaddrinfo on a dead resolver,
  a read from a stalled filesystem), so abandoning, not joining, is what
  keeps the caller's loop on time. Hung threads per check are capped.

Children of the daemon must not inherit its oom_score_adj of -1000, or a
php-fpm restarted by the healer would itself be unkillable. Commands are
therefore exec'd through util-linux ``choom -n 0 -- argv...``: choom sets
its *own* oom_score_adj and then execs the command in the same process, so
the value is in place before the command runs its first instruction or
forks. No shell is involved, and no ``preexec_fn`` (Python code between fork
and exec can deadlock on locks held by the daemon's other threads).
Raising the value needs no privilege. If choom is missing, the same two
steps are done by a tiny ``python -I -S -c`` trampoline.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from oomguard.config import Check

log = logging.getLogger(__name__)

MYSQL_PROTOCOL = 10
MYSQL_DEFAULT_PORT = 3306
_GREETING_MAX = 64 * 1024  # a real greeting is ~100 bytes


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str


# ---------------------------------------------------------------- cancellation


class Cancel:
    """Lets a watchdog abort a probe at its deadline.

    Sockets are shut down (which wakes a thread blocked in recv/connect on
    them) and registered process groups are SIGKILLed. Thread-safe; things
    registered after cancellation are aborted at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._pgids: list[int] = []
        self.cancelled = False

    def add_socket(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock)
            if not self.cancelled:
                return
        _shutdown(sock)

    def add_process_group(self, pgid: int) -> None:
        with self._lock:
            self._pgids.append(pgid)
            if not self.cancelled:
                return
        _killpg(pgid)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            socks, pgids = list(self._socks), list(self._pgids)
        for s in socks:
            _shutdown(s)
        for g in pgids:
            _killpg(g)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------- targets


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


def _connect(target: tuple[str, int] | str, timeout: float, cancel: Cancel | None) -> socket.socket:
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


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(e, ssl.SSLError):
        return f"TLS error: {e.reason or e}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or e.__class__.__name__


# ---------------------------------------------------------------- probes


def probe_tcp(target: str, timeout: float, cancel: Cancel | None = None) -> ProbeResult:
    """Healthy when a TCP connection to host:port is accepted."""
    try:
        sock = _connect(parse_hostport(target), timeout, cancel)
    except (OSError, ValueError) as e:
        return ProbeResult(False, f"connect {target}: {_describe(e)}")
    sock.close()
    return ProbeResult(True, f"connected to {target}")


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
        raw = _connect((host, port), timeout, cancel)
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
        return ProbeResult(False, f"GET {url}: {_describe(e)}")
    finally:
        conn.close()
    if status != expect_status:
        return ProbeResult(False, f"GET {url}: status {status}, expected {expect_status}")
    return ProbeResult(True, f"GET {url}: status {status}")


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
        sock = _connect(addr, timeout, cancel)
    except (OSError, ValueError) as e:
        return ProbeResult(False, f"connect {target}: {_describe(e)}")
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
        return ProbeResult(False, f"greeting from {target}: {_describe(e)}")
    finally:
        sock.close()


# ---------------------------------------------------------------- commands


@dataclass(frozen=True)
class CommandResult:
    returncode: int | None  # None: could not start, or did not exit after SIGKILL
    timed_out: bool
    output: str  # the start of stdout+stderr, for logs and events

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


# Used only where choom is missing: set our own oom_score_adj, then exec.
_TRAMPOLINE = (
    "import os,sys\n"
    "with open('/proc/self/oom_score_adj','w') as f: f.write(sys.argv[1])\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def child_argv(argv: Sequence[str], oom_score_adj: int = 0) -> list[str]:
    """argv wrapped so that the command starts at ``oom_score_adj`` instead of
    inheriting the daemon's -1000 (see the module docstring)."""
    choom = shutil.which("choom")
    if choom:
        return [choom, "-n", str(int(oom_score_adj)), "--", *argv]
    return [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, str(int(oom_score_adj)), *argv]


def run_command(
    argv: Sequence[str],
    timeout: float,
    *,
    oom_score_adj: int = 0,
    kill_group: bool = True,
    cancel: Cancel | None = None,
    output_limit: int = 2048,
) -> CommandResult:
    """Run argv (no shell) at ``oom_score_adj``, in a session of its own.

    At the time-out the command is SIGKILLed: its whole process group if
    ``kill_group`` (checks: nothing they start may linger), else only the
    process itself (restart commands: the service they start may share the
    group and must survive). Output goes to a temp file, not a pipe, so a
    background child holding the pipe open cannot hang us."""
    if not argv:
        return CommandResult(None, False, "empty command")
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(
                child_argv(argv, oom_score_adj),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as e:
            return CommandResult(None, False, f"cannot start {argv[0]}: {e.strerror or e}")
        if cancel is not None and kill_group:
            cancel.add_process_group(proc.pid)
        timed_out = False
        try:
            rc: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            if kill_group:
                _killpg(proc.pid)
            else:
                proc.kill()
            try:
                rc = proc.wait(1.0)
            except subprocess.TimeoutExpired:
                rc = None  # stuck in D state; the Popen object reaps it later
        if kill_group and not timed_out:
            _killpg(proc.pid)  # leftovers a check put in the background
        out.seek(0)
        text = out.read(output_limit).decode("utf-8", "replace").strip()
    return CommandResult(rc, timed_out, text)


def probe_command(argv: Sequence[str], timeout: float, cancel: Cancel | None = None) -> ProbeResult:
    """Healthy when the command exits 0 within the time-out."""
    r = run_command(argv, timeout, cancel=cancel)
    first = r.output.splitlines()[0][:200] if r.output else ""
    if r.timed_out:
        return ProbeResult(False, f"command killed after {timeout:g}s time-out")
    if r.returncode is None:
        return ProbeResult(False, r.output or "command did not start")
    if r.returncode != 0:
        return ProbeResult(False, f"exit {r.returncode}" + (f": {first}" if first else ""))
    return ProbeResult(True, "exit 0")


def probe(check: Check, cancel: Cancel | None = None) -> ProbeResult:
    """Run one check once; never raises."""
    try:
        if check.kind == "http":
            return probe_http(check.target, check.timeout, check.expect_status, cancel)
        if check.kind == "tcp":
            return probe_tcp(check.target, check.timeout, cancel)
        if check.kind == "mysql":
            return probe_mysql(check.target, check.timeout, cancel)
        if check.kind == "command":
            import shlex

            return probe_command(shlex.split(check.target), check.timeout, cancel)
        return ProbeResult(False, f"unknown check kind {check.kind!r}")
    except Exception as e:  # noqa: BLE001 - a probe must never take the monitor down
        log.exception("check %s: probe crashed", check.name)
        return ProbeResult(False, f"probe crashed: {e.__class__.__name__}: {e}")


ProbeFn = Callable[[Check, Cancel], ProbeResult]


def probe_with_deadline(check: Check, slack: float = 1.0, probe_fn: ProbeFn = probe) -> ProbeResult:
    """One probe, for callers without a monitor (e.g. a CLI): returns within
    about ``timeout + slack`` however the endpoint behaves."""
    result: list[ProbeResult] = []
    cancel = Cancel()
    t = threading.Thread(
        target=lambda: result.append(probe_fn(check, cancel)),
        name=f"probe-{check.name}",
        daemon=True,
    )
    t.start()
    t.join(check.timeout + slack)
    if result:
        return result[0]
    cancel.cancel()
    return ProbeResult(False, f"no answer within {check.timeout:g}s (probe abandoned)")


# ---------------------------------------------------------------- the monitor


@dataclass(frozen=True)
class Observation:
    """One finished probe. Times are on the caller's clock (the healer uses
    CLOCK_BOOTTIME): ``started`` when the probe was launched, ``finished``
    when its result was collected."""

    check: str
    ok: bool
    detail: str
    started: float
    finished: float
    abandoned: bool = False


@dataclass
class _InFlight:
    thread: threading.Thread | None
    cancel: Cancel
    started: float
    deadline: float
    result: list[ProbeResult] = field(default_factory=list)


@dataclass
class CheckState:
    check: Check
    failures: int = 0  # consecutive
    streak_start: float | None = None  # launch time of the first failure of the streak
    last_ok: bool | None = None
    last_detail: str = ""
    last_started: float | None = None
    last_finished: float | None = None
    probes: int = 0
    next_due: float = 0.0
    in_flight: _InFlight | None = None
    hung: list[tuple[threading.Thread, Cancel]] = field(default_factory=list)

    @property
    def down(self) -> bool:
        return self.failures >= self.check.failures


class HealthMonitor:
    """Runs the checks at their intervals; ``poll(now)`` never blocks.

    ``threaded=False`` runs probes inline in poll(), for tests that drive the
    monitor with a fake clock and a scripted probe function."""

    def __init__(
        self,
        checks: Sequence[Check],
        probe_fn: ProbeFn = probe,
        *,
        threaded: bool = True,
        slack: float = 1.0,
        max_hung: int = 4,
    ):
        self.checks = tuple(checks)
        self.probe_fn = probe_fn
        self.threaded = threaded
        self.slack = slack
        self.max_hung = max_hung
        self._lock = threading.Lock()
        self.states: dict[str, CheckState] = {c.name: CheckState(c) for c in self.checks}

    # ------------------------------------------------------------ driving

    def poll(self, now: float) -> list[Observation]:
        """Collect finished probes, abandon overdue ones, launch due ones."""
        out: list[Observation] = []
        with self._lock:
            for cs in self.states.values():
                cs.hung = [(t, c) for t, c in cs.hung if t.is_alive()]
                fl = cs.in_flight
                if fl is not None:
                    if fl.result:
                        out.append(self._record(cs, fl.result[0], fl.started, now))
                        cs.in_flight = None
                    elif now >= fl.deadline:
                        fl.cancel.cancel()
                        if fl.thread is not None and fl.thread.is_alive():
                            cs.hung.append((fl.thread, fl.cancel))
                        res = ProbeResult(
                            False, f"no answer within {cs.check.timeout:g}s (probe abandoned)"
                        )
                        out.append(self._record(cs, res, fl.started, now, abandoned=True))
                        cs.in_flight = None
                if cs.in_flight is None and now >= cs.next_due:
                    cs.next_due = now + cs.check.interval
                    if len(cs.hung) >= self.max_hung:
                        res = ProbeResult(
                            False, f"{len(cs.hung)} earlier probes still hung; not starting another"
                        )
                        out.append(self._record(cs, res, now, now))
                    else:
                        obs = self._launch(cs, now)
                        if obs is not None:
                            out.append(obs)
        return out

    def _launch(self, cs: CheckState, now: float) -> Observation | None:
        cancel = Cancel()
        if not self.threaded:
            return self._record(cs, self._safe_probe(cs.check, cancel), now, now)
        fl = _InFlight(None, cancel, now, now + cs.check.timeout + self.slack)

        def work() -> None:
            fl.result.append(self._safe_probe(cs.check, cancel))

        fl.thread = threading.Thread(target=work, name=f"probe-{cs.check.name}", daemon=True)
        cs.in_flight = fl
        fl.thread.start()
        return None

    def _safe_probe(self, check: Check, cancel: Cancel) -> ProbeResult:
        try:
            return self.probe_fn(check, cancel)
        except Exception as e:  # noqa: BLE001 - an injected probe must not kill the loop
            return ProbeResult(False, f"probe crashed: {e.__class__.__name__}: {e}")

    def _record(
        self, cs: CheckState, res: ProbeResult, started: float, now: float, abandoned: bool = False
    ) -> Observation:
        cs.probes += 1
        if res.ok:
            cs.failures, cs.streak_start = 0, None
        else:
            if cs.failures == 0:
                cs.streak_start = started
            cs.failures += 1
        if cs.last_ok != res.ok or (not res.ok and cs.failures == cs.check.failures):
            level = logging.INFO if res.ok else logging.WARNING
            log.log(
                level,
                "check %s: %s (%d consecutive failures)",
                cs.check.name,
                res.detail,
                cs.failures,
            )
        cs.last_ok, cs.last_detail = res.ok, res.detail
        cs.last_started, cs.last_finished = started, now
        return Observation(cs.check.name, res.ok, res.detail, started, now, abandoned)

    def close(self) -> None:
        """Abort every probe still running (sockets shut, command process
        groups killed): nothing a check started outlives the monitor."""
        with self._lock:
            for cs in self.states.values():
                if cs.in_flight is not None:
                    cs.in_flight.cancel.cancel()
                    cs.in_flight = None
                for _, cancel in cs.hung:
                    cancel.cancel()

    def probe_soon(self) -> None:
        """Make every check due at the next poll (after a restart, to verify)."""
        with self._lock:
            for cs in self.states.values():
                cs.next_due = 0.0

    # ------------------------------------------------------------ queries

    def down(self) -> bool:
        """Some check has failed its threshold number of times in a row."""
        with self._lock:
            return any(cs.down for cs in self.states.values())

    def down_checks(self) -> list[str]:
        with self._lock:
            return [n for n, cs in self.states.items() if cs.down]

    def down_since(self) -> float | None:
        """Launch time of the first failing probe of the earliest down check."""
        with self._lock:
            starts = [
                cs.streak_start
                for cs in self.states.values()
                if cs.down and cs.streak_start is not None
            ]
        return min(starts) if starts else None

    def healthy(self) -> bool:
        """Every check's latest probe passed (False until all have run)."""
        with self._lock:
            return bool(self.states) and all(cs.last_ok is True for cs in self.states.values())

    def status(self) -> dict[str, dict]:
        with self._lock:
            return {
                name: {
                    "kind": cs.check.kind,
                    "target": cs.check.target,
                    "healthy": cs.last_ok,
                    "down": cs.down,
                    "failures": cs.failures,
                    "threshold": cs.check.failures,
                    "detail": cs.last_detail,
                    "probes": cs.probes,
                    "in_flight": cs.in_flight is not None,
                    "hung_probes": len([t for t, _ in cs.hung if t.is_alive()]),
                }
                for name, cs in self.states.items()
            }
