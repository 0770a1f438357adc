"""The broker against hostile peers, on the host.

Real sockets, real peer credentials from the kernel. The final -1000 write
needs CAP_SYS_RESOURCE, which this host lacks; the full grant is proven in
the guest."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest

from oomguard import broker, config
from oomguard.broker import Broker, Granter, Peer
from oomguard.host import procfs
from oomguard.runs.registry import RunRegistry


@pytest.fixture
def served(tmp_path):
    def start(**protect):
        base = config.ProtectConfig(socket=str(tmp_path / "s" / "protect.sock"), request_timeout=0.5)
        cfg = config.Config(protect=replace(base, **protect))
        refusals = []
        granter = Granter(cfg.protect, RunRegistry(tmp_path / "runs.json", "boot"),
                          on_refusal=lambda peer, reason, msg: refusals.append((peer.uid, reason, msg)))
        b = Broker(cfg, granter, {"echo": lambda peer, req: {"uid": peer.uid, "pid": peer.pid}})
        stop = threading.Event()
        t = threading.Thread(target=b.serve, args=(stop,), daemon=True)
        t.start()
        assert b.ready.wait(5)
        started.append((stop, t))
        b.refusals = refusals
        return b

    started = []
    yield start
    for stop, t in started:
        stop.set()
        t.join(5)


def connect(b):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(b.config.socket)
    return s


def ask(b, data: bytes) -> dict:
    s = connect(b)
    s.sendall(data)
    reply = s.makefile("rb").readline()
    s.close()
    return json.loads(reply)


def test_socket_is_reachable_by_every_user(served):
    b = served()
    assert os.stat(b.config.socket).st_mode & 0o777 == 0o666
    assert os.stat(os.path.dirname(b.config.socket)).st_mode & 0o777 == 0o755


def test_peer_identity_comes_from_the_kernel(served):
    b = served()
    reply = ask(b, b'{"op": "echo", "uid": 1234, "pid": 1}\n')
    assert reply == {"ok": True, "uid": 0, "pid": os.getpid()}


@pytest.mark.parametrize(
    "data, error",
    [
        (b"garbage\n", "malformed request"),
        (b"[1, 2]\n", "malformed request"),
        (b'{"op": 7}\n', "malformed request"),
        (b"\xff\xfe\n", "malformed request"),
        (b"[" * 5000 + b"\n", "request too large"),
        (b'{"op": "format-disk"}\n', "unknown op"),
        (b'{"op": "' + b"x" * 3000 + b'"}\n', "unknown op"),
    ],
)
def test_malformed_requests_get_a_clear_refusal_and_the_daemon_serves_on(served, data, error):
    b = served()
    reply = ask(b, data)
    assert reply["ok"] is False and error in reply["error"]
    assert ask(b, b'{"op": "ping"}\n') == {"ok": True, "uid": 0}


def test_half_closed_request(served):
    b = served()
    s = connect(b)
    s.sendall(b'{"op": "pro')
    s.shutdown(socket.SHUT_WR)
    reply = json.loads(s.makefile("rb").readline())
    assert "incomplete request" in reply["error"]


def test_slow_peer_times_out_without_stalling_others(served):
    b = served()
    slow = connect(b)
    slow.sendall(b'{"op"')
    assert ask(b, b'{"op": "ping"}\n')["ok"]  # served while the slow one waits
    reply = json.loads(slow.makefile("rb").readline())
    assert "timed out" in reply["error"]


def test_connection_caps_per_uid_and_total(served):
    b = served(max_connections_per_uid=3, max_connections=5)
    idle = [connect(b) for _ in range(3)]
    time.sleep(0.1)
    assert "too many connections from uid 0" in ask(b, b'{"op": "ping"}\n')["error"]
    for s in idle:
        s.close()
    # the broker frees the slots once it has read the EOFs; allow a loaded machine time
    deadline = time.monotonic() + 30
    while not ask(b, b'{"op": "ping"}\n')["ok"]:
        assert time.monotonic() < deadline, "slots were not freed after the peers closed"
        time.sleep(0.05)
    assert b.refusals and b.refusals[0][1] == "busy"


def test_total_cap(served):
    b = served(max_connections_per_uid=10, max_connections=2)
    idle = [connect(b) for _ in range(2)]
    time.sleep(0.1)
    assert "too many connections" in ask(b, b'{"op": "ping"}\n')["error"]
    for s in idle:
        s.close()


def test_root_is_not_allowed_by_default(served):
    b = served()
    reply = ask(b, b'{"op": "protect"}\n')
    assert reply["ok"] is False and "regular login users" in reply["error"]
    assert b.refusals[-1][:2] == (0, "not_allowed")


def test_allowed_user_reaches_the_privileged_write(served):
    """As far as this host can go: the write is refused for lack of CAP_SYS_RESOURCE."""
    b = served(allow_uids=frozenset({0}))
    reply = ask(b, b'{"op": "protect"}\n')
    assert reply["ok"] is False and "could not set oom_score_adj" in reply["error"]


def test_groups_come_from_so_peergroups(served, tmp_path):
    b = served(allow_uids=frozenset(), allow_gids=frozenset({4321}))
    code = (
        "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
        "s.sendall(b'{\"op\": \"protect\"}\\n'); print(s.makefile().readline())"
    )
    def via(groups):
        out = subprocess.run(["setpriv", f"--groups={groups}", sys.executable, "-c", code, b.config.socket],
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out)["error"]
    assert "could not set oom_score_adj" in via("4321,5")  # allowed by group: reaches the write
    assert "not in [protect] allow_users or allow_groups" in via("5")


def test_pin_refuses_a_process_started_after_accept():
    """The pid-reuse defence: a process younger than the connection is not the peer."""
    accepted = procfs.since_boot()
    time.sleep(0.05)
    child = subprocess.Popen(["sleep", "5"])
    try:
        peer = Peer(pid=child.pid, uid=0, gid=0, groups=(), accepted=accepted)
        broker.pin(peer)
        assert peer.pin_error == "the requesting process is not the one that connected"
        peer.close()
        older = Peer(pid=child.pid, uid=0, gid=0, groups=(), accepted=procfs.since_boot())
        broker.pin(older)
        assert older.pin_error is None and older.pidfd is not None and older.dirfd is not None
        older.close()
    finally:
        child.kill()
        child.wait()


def test_pin_refuses_a_dead_process():
    child = subprocess.Popen(["true"])
    child.wait()
    peer = Peer(pid=child.pid, uid=0, gid=0, groups=(), accepted=procfs.since_boot())
    broker.pin(peer)
    assert peer.pin_error == "the requesting process is gone"


def test_grant_checks_identity_through_the_pinned_fd(tmp_path):
    """A peer whose uids differ from SO_PEERCRED's (a setuid exec after connecting) is refused."""
    child = subprocess.Popen(["sleep", "5"])
    try:
        peer = Peer(pid=child.pid, uid=1000, gid=1000, groups=(), accepted=procfs.since_boot())
        broker.pin(peer)
        g = Granter(config.ProtectConfig(allow_uids=frozenset({1000})), RunRegistry(tmp_path / "r.json", "b"))
        with pytest.raises(broker.Refusal, match="changed identity"):
            g.grant(peer)
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("tty_nr, path", [(0, None), (os.makedev(136, 3), "/dev/pts/3"),
                                          (os.makedev(137, 1), "/dev/pts/257"), (os.makedev(4, 1), "/dev/tty1")])
def test_tty_path(tty_nr, path):
    assert broker.tty_path(tty_nr) == path


def test_systemd_scope_request_names_only_the_peer():
    argv = broker.systemd_scope_argv("oomguard-run-7.scope", 4242, "user-1000.slice", "oom-protect run 7")
    assert argv[:2] == ["busctl", "call"] and "StartTransientUnit" in argv
    assert argv[argv.index("PIDs") : argv.index("PIDs") + 4] == ["PIDs", "au", "1", "4242"]


def test_default_allow_list_is_login_users():
    cfg = config.ProtectConfig()
    mk = lambda uid: Peer(pid=1, uid=uid, gid=uid, groups=(), accepted=0)  # noqa: E731
    assert broker.is_allowed(cfg, mk(1000), (1000, 60000))
    assert not broker.is_allowed(cfg, mk(999), (1000, 60000))  # system account
    assert not broker.is_allowed(cfg, mk(65534), (1000, 60000))  # nobody
    assert not broker.is_allowed(cfg, mk(0), (1000, 60000))
