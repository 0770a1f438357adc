"""The broker: the privileged half of oom-protect, and the daemon's socket.

One Unix socket serves every local user. Each connection carries one JSON
request line and gets one JSON reply line. Who the peer is comes from the
kernel (SO_PEERCRED, SO_PEERGROUPS, SO_PEERPIDFD where the kernel has it),
never from what the peer says; every byte it sends is treated as hostile.

A "protect" request protects the connecting process and nothing else:

1. at accept, pin the peer: a pidfd and an fd on /proc/<pid>; the pidfd is
   checked alive after the dir fd is opened, so both name the same process,
   and that process must have started no later than the accept;
2. at grant, re-read its uids through the dir fd (real, effective and saved
   must all be the SO_PEERCRED uid, so a setuid exec after connecting fails);
3. make the run's cgroup under the caller's own and move the process in;
4. write -1000 through the dir fd (a reused pid cannot redirect it);
5. confirm the pidfd still refers to a live process.

The broker runs in its own thread with a selector loop, per-connection
deadlines and connection caps, so a flood or a slow peer cannot stall it or
the daemon's other threads.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pwd
import queue
import select
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from oomguard.config import Config, ProtectConfig, login_uid_range
from oomguard.host import cgroups, procfs
from oomguard.runs import lifecycle
from oomguard.runs.lifecycle import RunLifecycle, RunRefused
from oomguard.runs.registry import Run, RunRegistry

log = logging.getLogger(__name__)

MAX_REQUEST = 4096
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
SO_PEERPIDFD = 77  # Linux 6.5+
PROTECTED = -1000


class Refusal(Exception):
    """A request the broker declines; ``reason`` is a short metric label."""

    def __init__(self, message: str, reason: str = "refused"):
        super().__init__(message)
        self.reason = reason


@dataclass
class Peer:
    """A connected process as the kernel describes it."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]
    accepted: float  # CLOCK_BOOTTIME seconds, the clock of stat's starttime
    pidfd: int | None = None
    dirfd: int | None = None
    pin_error: str | None = None  # why the process could not be pinned

    @property
    def user(self) -> str:
        return user_name(self.uid)

    def close(self) -> None:
        for fd in (self.pidfd, self.dirfd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.pidfd = self.dirfd = None


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def pidfd_alive(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    return not select.select([pidfd], [], [], 0)[0]


def peer_credentials(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups: tuple[int, ...] = ()
    for size in (256, 65536):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * size)
            groups = struct.unpack(f"{len(raw) // 4}I", raw)
            break
        except OSError as e:
            if e.errno != errno.ERANGE:
                break
    peer = Peer(pid=pid, uid=uid, gid=gid, groups=groups, accepted=procfs.since_boot())
    try:
        peer.pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        peer.pidfd = None
    return peer


def pin(peer: Peer) -> None:
    """Bind the peer to one process for the life of the connection."""
    try:
        if peer.pidfd is None:
            peer.pidfd = os.pidfd_open(peer.pid)
        peer.dirfd = procfs.open_dir(peer.pid)
        if not pidfd_alive(peer.pidfd):
            raise ProcessLookupError
        start = procfs.read_stat(dir_fd=peer.dirfd).starttime
    except (ProcessLookupError, FileNotFoundError, OSError):
        peer.pin_error = "the requesting process is gone"
        return
    if start > peer.accepted * procfs.CLK_TCK + 1:
        # Started after the connection was accepted: a reused pid, not the peer.
        peer.pin_error = "the requesting process is not the one that connected"


def is_allowed(cfg: ProtectConfig, peer: Peer, uid_range: tuple[int, int] | None = None) -> bool:
    """Root is not special: with CAP_SYS_RESOURCE it needs no broker, and
    without it (a container) the broker must not hand it what it lacks."""
    if cfg.allow_gids and (peer.gid in cfg.allow_gids or set(peer.groups) & cfg.allow_gids):
        return True
    if cfg.allow_uids is None:
        lo, hi = uid_range or login_uid_range()
        return lo <= peer.uid <= hi and not cfg.allow_gids
    return peer.uid in cfg.allow_uids


def refusal_text(cfg: ProtectConfig, peer: Peer) -> str:
    if cfg.allow_uids is None and not cfg.allow_gids:
        lo, hi = login_uid_range()
        return (
            f"user {peer.user} (uid {peer.uid}) may not request protection: by default only "
            f"regular login users (uid {lo}-{hi}) may; see [protect] allow_users"
        )
    return f"user {peer.user} (uid {peer.uid}) is not in [protect] allow_users or allow_groups"


# ---------------------------------------------------------------- run cgroups


def systemd_scope_argv(name: str, pid: int, slice_: str, description: str) -> list[str]:
    """busctl call that asks systemd for a transient scope holding ``pid``."""
    return [
        "busctl", "call", "--system", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))",
        name, "fail", "3",
        "PIDs", "au", "1", str(pid),
        "Slice", "s", slice_,
        "Description", "s", description,
        "0",
    ]  # fmt: skip


def make_run_cgroup(run_id: int, pid: int, caller_cgroup: str | None) -> str | None:
    """Give the run a cgroup of its own, inside whatever limits its caller had."""
    if caller_cgroup is None or not cgroups.is_v2():
        return None
    if cgroups.systemd_booted():
        unit = cgroups.unit_of(caller_cgroup)
        parent = caller_cgroup.rsplit("/", 1)[0] if unit else caller_cgroup
        slice_ = parent.rsplit("/", 1)[-1] or "-.slice"
        # A scope beside the caller's unit would escape limits set on that unit
        # itself; only use one when the unit sets none.
        if (
            unit
            and slice_.endswith(".slice")
            and cgroups.memory_max(caller_cgroup) is None
            and _systemd_scope(run_id, pid, slice_)
        ):
            return cgroups.join(parent, f"oomguard-run-{run_id}.scope")
    return lifecycle.make_cgroup(run_id, pid, caller_cgroup)  # refuses a planted or unmakeable one


def _systemd_scope(run_id: int, pid: int, slice_: str) -> bool:
    import subprocess

    argv = systemd_scope_argv(f"oomguard-run-{run_id}.scope", pid, slice_, f"oom-protect run {run_id}")
    try:
        r = subprocess.run(argv, capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("run %d: systemd scope failed: %s", run_id, e)
        return False
    if r.returncode != 0:
        log.warning("run %d: systemd scope failed: %s", run_id, r.stderr.decode(errors="replace").strip())
    return r.returncode == 0


def tty_path(tty_nr: int) -> str | None:
    """/dev/pts/N or /dev/ttyN from a stat tty_nr."""
    if tty_nr == 0:
        return None
    major, minor = os.major(tty_nr), os.minor(tty_nr)
    if 136 <= major <= 143:
        return f"/dev/pts/{(major - 136) * 256 + minor}"
    if major == 4:
        return f"/dev/tty{minor}" if minor < 64 else f"/dev/ttyS{minor - 64}"
    return None


# ---------------------------------------------------------------- grants


class Granter:
    """The privileged act, kept apart from socket handling so tests can drive it."""

    def __init__(
        self,
        config: ProtectConfig,
        registry: RunRegistry,
        on_grant: Callable[[Run], None] = lambda run: None,
        on_refusal: Callable[[Peer, str, str], None] = lambda peer, reason, msg: None,
    ):
        self.config = config
        self.registry = registry
        self.lifecycle = RunLifecycle(registry)
        self.on_grant = on_grant
        self.on_refusal = on_refusal
        self._cmdline_readers = threading.BoundedSemaphore(8)

    def command_of(self, peer: Peer) -> str:
        """The peer's command line for the log: bounded in time and size,
        with a cap on readers stuck behind hostile processes."""
        if not self._cmdline_readers.acquire(blocking=False):
            return "<cmdline not read: too many pending reads>"
        try:
            return procfs.read_cmdline_bounded(peer.pid, peer.dirfd, timeout=0.2, limit=512)
        finally:
            self._cmdline_readers.release()

    def grant(self, peer: Peer) -> Run:
        try:
            return self._grant(peer)
        except Refusal as r:
            log.warning(
                "refused protection: uid=%d user=%s pid=%d reason=%s: %s",
                peer.uid, peer.user, peer.pid, r.reason, r,
            )  # fmt: skip
            self.on_refusal(peer, r.reason, str(r))
            raise

    def _grant(self, peer: Peer) -> Run:
        try:
            return self._grant_run(peer)
        except RunRefused as r:
            raise Refusal(str(r), r.reason) from None

    def _grant_run(self, peer: Peer) -> Run:
        if not is_allowed(self.config, peer):
            raise Refusal(refusal_text(self.config, peer), "not_allowed")
        if peer.pin_error or peer.dirfd is None or peer.pidfd is None:
            raise Refusal(peer.pin_error or "the requesting process is gone", "gone")
        try:
            status = procfs.read_status(dir_fd=peer.dirfd)
            st = procfs.read_stat(dir_fd=peer.dirfd)
            caller_cgroup = procfs.read_cgroup(dir_fd=peer.dirfd)
        except (ProcessLookupError, FileNotFoundError, ValueError, OSError):
            raise Refusal("the requesting process is gone", "gone") from None
        if status.tgid != peer.pid:
            raise Refusal("the requesting process is gone", "gone")
        if set(status.uids[:3]) != {peer.uid}:
            raise Refusal(
                f"the requesting process changed identity (uids {status.uids[:3]}, connected as {peer.uid})",
                "identity",
            )
        existing = self.lifecycle.admit(
            peer.uid, peer.pid, st.starttime, caller_cgroup, self.config.max_runs_per_uid
        )
        if existing is not None:
            return self._rejoin(peer, existing)  # never a second run nested in the first
        command = self.command_of(peer)
        run_id = self.registry.new_id()
        cgroup = make_run_cgroup(run_id, peer.pid, caller_cgroup) if self.config.run_cgroups else None
        run = Run(
            id=run_id,
            uid=peer.uid,
            user=peer.user,
            pid=peer.pid,
            starttime=st.starttime,
            started=time.time(),
            command=command,
            cgroup=cgroup,
            tty=tty_path(st.tty_nr),
        )
        # Registered before the write, under the registry's lock: the policy
        # checks protection under the same lock, so it can never overwrite
        # the -1000 with a class value it decided a moment earlier.
        with self.registry.lock:
            self.lifecycle.begin(run)
            try:
                procfs.write_oom_score_adj(PROTECTED, dir_fd=peer.dirfd)
                if not pidfd_alive(peer.pidfd):
                    raise ProcessLookupError
            except (ProcessLookupError, FileNotFoundError):
                self._undo(run)
                raise Refusal("the requesting process is gone", "gone") from None
            except OSError as e:
                self._undo(run)
                raise Refusal(f"the broker could not set oom_score_adj: {e.strerror}", "error") from None
        self.registry.flush()  # on disk before the reply, off the lock; a full disk is logged
        log.info(
            "granted protection: run=%d uid=%d user=%s pid=%d cgroup=%s command=%r",
            run.id, run.uid, run.user, run.pid, cgroup, command,
        )  # fmt: skip
        self.on_grant(run)
        return run

    def _rejoin(self, peer: Peer, run: Run) -> Run:
        """A process of an active run asked (again): it gets that run back,
        and the value the run's processes have; no new run, no new cgroup."""
        with self.registry.lock:
            try:
                procfs.write_oom_score_adj(PROTECTED, dir_fd=peer.dirfd)
                if not pidfd_alive(peer.pidfd):
                    raise ProcessLookupError
            except (ProcessLookupError, FileNotFoundError):
                raise Refusal("the requesting process is gone", "gone") from None
            except OSError as e:
                raise Refusal(f"the broker could not set oom_score_adj: {e.strerror}", "error") from None
        log.info("protection asked again: run=%d uid=%d pid=%d gets its run back", run.id, run.uid, peer.pid)
        return run

    def _undo(self, run: Run) -> None:
        self.lifecycle.abandon(run)


# ---------------------------------------------------------------- the socket


@dataclass
class _Conn:
    sock: socket.socket
    peer: Peer
    deadline: float
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytes = b""
    replied: bool = False


Handler = Callable[[Peer, dict], dict]


class Broker:
    """The socket server. ``handlers`` answer the ops other than "protect"
    (runs, events, status, kill-run, ...), given the kernel-verified peer.
    Ops in ``slow_ops`` (kill-run waits out a SIGTERM grace) run in a thread
    of their own, so the loop keeps serving grants meanwhile."""

    def __init__(
        self,
        config: Config,
        granter: Granter,
        handlers: dict[str, Handler] | None = None,
        slow_ops: frozenset[str] = frozenset(),
    ):
        self.config = config.protect
        self.granter = granter
        self.handlers = dict(handlers or {})
        self.slow_ops = slow_ops
        self._finished: queue.SimpleQueue[tuple[_Conn, dict]] = queue.SimpleQueue()
        self.sock: socket.socket | None = None
        self._conns: dict[int, _Conn] = {}
        self._per_uid: dict[int, int] = {}
        self._sel = selectors.DefaultSelector()
        self.ready = threading.Event()

    # ------------------------------------------------------------ lifecycle

    def bind(self) -> None:
        path = Path(self.config.socket)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o755)
        if path.exists() or path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
                raise RuntimeError(f"another daemon is already serving {path}")
            except (ConnectionRefusedError, FileNotFoundError):
                path.unlink(missing_ok=True)
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The allow-list is enforced per connection from SO_PEERCRED; the
        # socket itself must be reachable by every user who may be allowed.
        old = os.umask(0o111)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o666)
        sock.listen(128)
        sock.setblocking(False)
        self.sock = sock
        self._sel.register(sock, selectors.EVENT_READ, None)

    def close(self) -> None:
        for conn in list(self._conns.values()):
            self._drop(conn)
        if self.sock is not None:
            self._sel.unregister(self.sock)
            self.sock.close()
            self.sock = None
            try:
                os.unlink(self.config.socket)
            except OSError:
                pass

    def serve(self, stop: threading.Event) -> None:
        if self.sock is None:
            self.bind()
        self.ready.set()
        try:
            while not stop.is_set():
                self.step(0.2)
        finally:
            self.close()

    def step(self, timeout: float) -> None:
        for key, mask in self._sel.select(timeout):
            if key.data is None:
                self._accept()
                continue
            conn: _Conn = key.data
            try:
                if mask & selectors.EVENT_READ and not conn.replied:
                    self._read(conn)
                if mask & selectors.EVENT_WRITE:
                    self._flush(conn)
            except Exception:  # noqa: BLE001 - no peer may crash the daemon
                log.exception("broker: dropping connection from pid %d", conn.peer.pid)
                self._drop(conn)
        while not self._finished.empty():
            conn, reply = self._finished.get()
            if conn.sock.fileno() in self._conns:
                self._reply(conn, reply)
        now = time.monotonic()
        for conn in list(self._conns.values()):
            if now >= conn.deadline:
                if conn.replied:
                    self._drop(conn)
                else:
                    self._reply(conn, {"ok": False, "error": "request timed out: send one JSON line"})

    # ------------------------------------------------------------ connections

    def _accept(self) -> None:
        assert self.sock is not None
        for _ in range(64):
            try:
                sock, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: keep serving the rest
                log.error("broker: accept failed: %s", e)
                time.sleep(0.05)
                return
            sock.setblocking(False)
            try:
                peer = peer_credentials(sock)
            except OSError:
                sock.close()
                continue
            conn = _Conn(sock, peer, time.monotonic() + self.config.request_timeout)
            if len(self._conns) >= self.config.max_connections:
                self._refuse_now(conn, "the broker is busy: too many connections")
                continue
            if self._per_uid.get(peer.uid, 0) >= self.config.max_connections_per_uid:
                self._refuse_now(conn, f"too many connections from uid {peer.uid}")
                continue
            pin(peer)
            self._conns[sock.fileno()] = conn
            self._per_uid[peer.uid] = self._per_uid.get(peer.uid, 0) + 1
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _refuse_now(self, conn: _Conn, message: str) -> None:
        log.warning("broker: %s (pid %d)", message, conn.peer.pid)
        self.granter.on_refusal(conn.peer, "busy", message)
        try:
            conn.sock.send(encode({"ok": False, "error": message}))
        except OSError:
            pass
        conn.peer.close()
        conn.sock.close()

    def _read(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(MAX_REQUEST + 1 - len(conn.inbuf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not chunk:
            self._reply(conn, {"ok": False, "error": "incomplete request: connection closed before a newline"})
            return
        conn.inbuf += chunk
        if b"\n" in conn.inbuf:
            try:
                request = parse_request(bytes(conn.inbuf.split(b"\n", 1)[0]))
            except Refusal as r:
                self._reply(conn, {"ok": False, "error": str(r)})
                return
            if request["op"] in self.slow_ops:
                self._defer(conn, request)
            else:
                self._reply(conn, self.dispatch(conn.peer, request))
        elif len(conn.inbuf) > MAX_REQUEST:
            self._reply(conn, {"ok": False, "error": f"request too large (limit {MAX_REQUEST} bytes)"})

    def handle(self, peer: Peer, line: bytes) -> dict:
        """One request line from a kernel-identified peer to one reply."""
        try:
            request = parse_request(line)
        except Refusal as r:
            return {"ok": False, "error": str(r)}
        return self.dispatch(peer, request)

    def dispatch(self, peer: Peer, request: dict) -> dict:
        """A parsed request (one with an "op") to its reply."""
        op = request["op"]
        if op == "protect":
            try:
                run = self.granter.grant(peer)
            except Refusal as r:
                return {"ok": False, "error": str(r)}
            return {"ok": True, "run": run.id, "cgroup": run.cgroup}
        if op == "ping":
            return {"ok": True, "uid": peer.uid}
        handler = self.handlers.get(op)
        if handler is None:
            return {"ok": False, "error": f"unknown op {op[:40]!r}"}
        try:
            result = handler(peer, request)
        except Refusal as r:
            return {"ok": False, "error": str(r)}
        except Exception as e:  # noqa: BLE001
            log.exception("broker: op %r failed", op)
            return {"ok": False, "error": f"internal error: {e.__class__.__name__}"}
        return {"ok": True, **result}

    def _defer(self, conn: _Conn, request: dict) -> None:
        conn.replied = True  # no more reading, and no timeout while it works
        conn.deadline = float("inf")
        self._sel.unregister(conn.sock)
        threading.Thread(
            target=lambda: self._finished.put((conn, self.dispatch(conn.peer, request))),
            name="broker-slow-op",
            daemon=True,
        ).start()

    def _reply(self, conn: _Conn, reply: dict) -> None:
        conn.replied = True
        conn.outbuf = encode(reply)
        conn.deadline = time.monotonic() + self.config.request_timeout
        try:
            self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        except KeyError:  # unregistered while a slow op ran
            self._sel.register(conn.sock, selectors.EVENT_WRITE, conn)
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        conn.outbuf = conn.outbuf[sent:]
        if not conn.outbuf:
            self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if self._conns.pop(fd, None) is not None:
            self._per_uid[conn.peer.uid] -= 1
            if not self._per_uid[conn.peer.uid]:
                del self._per_uid[conn.peer.uid]
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.peer.close()
        conn.sock.close()


def parse_request(line: bytes) -> dict:
    """A request line as a dict with a string "op"; Refusal if it is not one."""
    try:
        request = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Refusal("malformed request: expected one JSON object", "invalid") from None
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        raise Refusal("malformed request: expected a JSON object with an \"op\"", "invalid")
    return request


def encode(reply: dict) -> bytes:
    """One reply line; "ok" first, as oom-protect reads the prefix."""
    ordered = {"ok": reply.get("ok", False), **{k: v for k, v in reply.items() if k != "ok"}}
    return (json.dumps(ordered, default=str) + "\n").encode()
