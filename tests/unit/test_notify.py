"""Event hooks, for real: commands run as nobody, webhooks POSTed to a real
HTTP receiver on loopback; hangs, refusals and floods stay the hook's."""

from __future__ import annotations

import http.server
import json
import os
import pwd
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from oomguard.config.notify import ExecHook, NotifyConfig, WebhookHook
from oomguard.notify.dispatch import Notifier
from oomguard.notify.execer import ExecDelivery, HookError
from oomguard.notify.payload import environment
from oomguard.notify.webhook import WebhookDelivery
from oomguard.notify.worker import HookWorker

NOBODY = pwd.getpwnam("nobody")
KILL = {"id": 42, "ts": 1700000000.5, "kind": "oom_kill", "uids": [1001],
        "data": {"victim_pid": 4242, "victim_comm": "php\nfake", "victim_uid": 1001, "task_memcg": "/app"}}  # fmt: skip
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="runs hooks as nobody")


@pytest.fixture
def drop_dir():
    """A directory nobody can write into (pytest's tmp_path is 0700 all the way up)."""
    with tempfile.TemporaryDirectory(prefix="oomguard-hook-") as d:
        os.chmod(d, 0o1777)
        yield Path(d)


RECORD = (
    "import json, os, sys; d = sys.argv[1]; "
    "open(os.path.join(d, os.environ['OOMGUARD_EVENT_ID']), 'w').write(json.dumps("
    "{'uid': os.getuid(), 'gid': os.getgid(), 'groups': os.getgroups(), 'cwd': os.getcwd(), "
    "'env': dict(os.environ), 'stdin': sys.stdin.read()}))"
)


def exec_hook(*argv: str, **kw) -> ExecHook:
    return ExecHook(command=(sys.executable, *argv), uid=NOBODY.pw_uid, gid=NOBODY.pw_gid, **kw)


class Receiver:
    """A real HTTP server on 127.0.0.1 that records POSTs; ``codes`` are
    answered in turn (then 200)."""

    def __init__(self, codes: list[int] | None = None):
        self.posts: list[tuple[dict, bytes]] = []
        self.codes = list(codes or [])
        self.got = threading.Condition()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                data = self.rfile.read(int(self.headers["Content-Length"]))
                code = outer.codes.pop(0) if outer.codes else 200
                with outer.got:
                    outer.posts.append((dict(self.headers), data))
                    outer.got.notify_all()
                self.send_response(code)
                if code in (301, 302, 307, 308):
                    self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait(self, n: int, timeout: float = 30) -> list[tuple[dict, bytes]]:
        with self.got:
            assert self.got.wait_for(lambda: len(self.posts) >= n, timeout), self.posts
            return list(self.posts)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def refused_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}/hook"


# ---------------------------------------------------------------- payload


def test_environment_carries_the_fields_and_nothing_from_the_daemon(monkeypatch) -> None:
    monkeypatch.setenv("SECRET_OF_THE_DAEMON", "x")
    env = environment(KILL)
    assert env["OOMGUARD_EVENT"] == "oom_kill" and env["OOMGUARD_EVENT_ID"] == "42"
    assert env["OOMGUARD_VICTIM_PID"] == "4242" and env["OOMGUARD_CGROUP"] == "/app"
    assert "OOMGUARD_RUN_ID" not in env  # an oom_kill's "id" is not a run's
    assert set(env) - {k for k in env if k.startswith("OOMGUARD_")} == {"PATH"}
    grant = {"kind": "grant", "ts": 1, "data": {"id": 7, "uid": 1001, "command": "php"}}
    assert environment(grant)["OOMGUARD_RUN_ID"] == "7"


# ---------------------------------------------------------------- exec


@needs_root
def test_an_exec_hook_runs_as_its_user_with_the_event(drop_dir: Path) -> None:
    ExecDelivery(exec_hook("-c", RECORD, str(drop_dir)))(KILL, threading.Event())
    seen = json.loads((drop_dir / "42").read_text())
    assert (seen["uid"], seen["gid"], seen["groups"]) == (NOBODY.pw_uid, NOBODY.pw_gid, [])
    assert seen["cwd"] == "/"
    assert seen["env"]["OOMGUARD_VICTIM_COMM"] == "php\nfake"
    assert json.loads(seen["stdin"]) == KILL


@needs_root
def test_a_hook_that_hangs_is_killed_with_all_it_started(drop_dir: Path) -> None:
    pidfile = drop_dir / "grandchild"
    hang = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '1000']); "
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(1000)")  # fmt: skip
    deliver = ExecDelivery(exec_hook("-c", hang, timeout=1.0))
    with pytest.raises(HookError, match="killed after 1 s"):
        deliver(KILL, threading.Event())
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{grandchild}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)  # reaped by init once killed
    assert not Path(f"/proc/{grandchild}/stat").exists() or " Z " in Path(f"/proc/{grandchild}/stat").read_text()


@needs_root
def test_missing_and_failing_commands_are_hook_errors() -> None:
    missing = ExecHook(command=("/nonexistent/notify",), uid=NOBODY.pw_uid, gid=NOBODY.pw_gid)
    with pytest.raises(HookError, match="cannot run /nonexistent/notify"):
        ExecDelivery(missing)(KILL, threading.Event())
    failing = exec_hook("-c", "import sys; sys.stderr.write('smtp down'); sys.exit(3)")
    with pytest.raises(HookError, match="exited 3: smtp down"):
        ExecDelivery(failing)(KILL, threading.Event())


@needs_root
def test_exec_hooks_are_rate_limited(drop_dir: Path) -> None:
    now = [0.0]
    deliver = ExecDelivery(exec_hook("-c", "pass", per_minute=2), clock=lambda: now[0])
    deliver(KILL, threading.Event())
    deliver(KILL, threading.Event())
    with pytest.raises(HookError, match="rate limit"):
        deliver(KILL, threading.Event())
    now[0] = 60.0  # the window moved on
    deliver(KILL, threading.Event())
    assert deliver.rate_limited == 1


# ---------------------------------------------------------------- webhook


def test_a_webhook_posts_the_event_as_json(receiver: Receiver) -> None:
    WebhookDelivery(WebhookHook(url=receiver.url, headers=(("X-Token", "t"),)))(KILL, threading.Event())
    [(headers, data)] = receiver.wait(1)
    assert json.loads(data) == KILL
    assert headers["Content-Type"] == "application/json" and headers["X-Token"] == "t"


def test_a_webhook_retries_server_errors_and_not_client_errors() -> None:
    r = Receiver(codes=[503, 500])
    try:
        hook = WebhookDelivery(WebhookHook(url=r.url, backoff=0.01))
        hook(KILL, threading.Event())
        assert hook.attempts == 3 and len(r.wait(3)) == 3
        r.codes = [404]
        once = WebhookDelivery(WebhookHook(url=r.url, backoff=0.01))
        with pytest.raises(HookError, match="HTTP 404, not retried"):
            once(KILL, threading.Event())
        assert once.attempts == 1
    finally:
        r.close()


def test_a_webhook_does_not_follow_redirects() -> None:
    r = Receiver(codes=[307])
    try:
        hook = WebhookDelivery(WebhookHook(url=r.url, retries=0))
        with pytest.raises(HookError):
            hook(KILL, threading.Event())
        assert len(r.posts) == 1  # nothing went to /elsewhere
    finally:
        r.close()


def test_a_refused_webhook_gives_up_after_its_retries() -> None:
    hook = WebhookDelivery(WebhookHook(url=refused_url(), retries=3, backoff=0.01))
    with pytest.raises(HookError, match="gave up after 4 attempts"):
        hook(KILL, threading.Event())


# ---------------------------------------------------------------- dispatch


@needs_root
def test_a_hanging_hook_and_a_dead_webhook_delay_no_one(receiver: Receiver, drop_dir: Path) -> None:
    cfg = NotifyConfig(
        exec=(exec_hook("-c", "import time; time.sleep(1000)", kinds=frozenset({"*"}), timeout=2.0),),
        webhook=(
            WebhookHook(url=refused_url(), kinds=frozenset({"*"}), retries=1000, backoff=0.05),
            WebhookHook(url=receiver.url, kinds=frozenset({"oom_kill"})),
        ),
    )
    n = Notifier(cfg)
    n.start()
    try:
        for i in range(5):
            n.notify({**KILL, "id": i})
            n.notify({"kind": "grant", "ts": 1, "data": {"id": i}})
        posts = receiver.wait(5)  # delivered while the others hang and retry
        assert [json.loads(d)["id"] for _, d in posts] == [0, 1, 2, 3, 4]  # only oom_kill, in order
    finally:
        n.stop(timeout=5)


def test_a_full_hook_queue_drops_and_counts() -> None:
    got = []
    w = HookWorker("t", lambda e, stop: got.append(e["id"]), maxsize=2)  # not started yet
    assert [w.submit({"id": i}) for i in range(3)] == [True, True, False]
    assert w.dropped == 1
    w.start()
    assert w.idle(10)
    assert got == [0, 1] and w.delivered == 2
    w.stop()
