"""A real `oomguard daemon` process on this host, through its socket and CLI.

This host: root without CAP_SYS_RESOURCE, cgroup v1, /dev/kmsg readable. So
no grant can complete here (the guest proves those); everything around it can
be driven for real: the socket ops' privacy and validation, `doctor`,
`config check`, start-up refusals, SIGHUP, and a daemon restarted (or
SIGKILLed) in the middle of an incident.

Each daemon gets a temp config: its socket under a 0755 temp dir (so that
`nobody` reaches it), its own state dir and events db, metrics on a free
loopback port, the policy *not* enforced (it would rewrite this host's
oom_score_adj values), and one health check against a closed port, so an
incident starts at once. The grace is an hour: the healer never acts.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from oomguard.forensics.events import SCHEMA_VERSION, EventStore
from oomguard.host import procfs
from oomguard.runs.registry import RunRegistry
from oomguard.runs.run import Run

BIN = Path(sys.executable).parent
OOMGUARD = str(BIN / "oomguard")
NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setpriv to nobody, /dev/kmsg)"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv"),
]


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
        time.sleep(interval)


def config_text(base: Path, *, sock: str, metrics_port: int, closed_port: int, extra: str = "",
                protect_extra: str = "") -> str:
    return f"""
[daemon]
state_dir = "{base / 'state'}"
log_level = "debug"

[protect]
socket = "{sock}"
{protect_extra}

[events]
db = "{base / 'state' / 'events.db'}"

[metrics]
listen = "127.0.0.1:{metrics_port}"

[policy]
enforce = false

[healer]
grace = "1h"
window = []
term_timeout = "2s"

[[healer.check]]
name = "shop"
tcp = "127.0.0.1:{closed_port}"
interval = "0.2s"
timeout = "0.5s"
failures = 1
{extra}
"""


@dataclass
class HostDaemon:
    base: Path
    metrics_port: int = field(default_factory=free_port)
    closed_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def sock(self) -> str:
        return str(self.base / "run" / "protect.sock")

    @property
    def config(self) -> Path:
        return self.base / "oomguard.toml"

    @property
    def state(self) -> Path:
        return self.base / "state"

    @property
    def db(self) -> Path:
        return self.state / "events.db"

    @property
    def log(self) -> Path:
        return self.base / "daemon.log"

    def write_config(self, **kw) -> None:
        self.config.write_text(config_text(self.base, sock=self.sock, metrics_port=self.metrics_port,
                                           closed_port=self.closed_port, **kw))

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OOMGUARD_")}
        return {**env, "OOMGUARD_SOCKET": self.sock, "LANG": "C.UTF-8"}

    def launch(self) -> subprocess.Popen:
        with open(self.log, "ab") as log:
            return subprocess.Popen([OOMGUARD, "--config", str(self.config), "daemon"],
                                    stdout=log, stderr=subprocess.STDOUT, env=self.env())

    def start(self) -> HostDaemon:
        assert self.proc is None or self.proc.poll() is not None
        self.proc = self.launch()
        wait_for(lambda: self._answers() or self.proc.poll() is not None, timeout=30)
        assert self.proc.poll() is None, f"the daemon did not start:\n{self.log_text()}"
        return self

    def _answers(self) -> bool:
        try:
            return self.request("ping")["ok"]
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def request(self, op: str, *, raw: bytes | None = None, timeout: float = 10, **fields) -> dict:
        """One request as root, straight on the socket (no client-side checks)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.sock)
            s.sendall(raw if raw is not None else (json.dumps({"op": op, **fields}) + "\n").encode())
            return json.loads(s.makefile("rb").readline())

    def cli(self, *args: str, nobody: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
        argv = [OOMGUARD, "--config", str(self.config), *args]
        return subprocess.run((AS_NOBODY if nobody else []) + argv, capture_output=True, text=True,
                              timeout=timeout, env=self.env())

    def cli_json(self, *args: str, nobody: bool = False):
        r = self.cli(*args, "--json", nobody=nobody)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return json.loads(r.stdout)


@pytest.fixture
def base():
    # Not pytest's tmp_path: its parents are 0700, and nobody must reach the socket.
    d = Path(tempfile.mkdtemp(prefix="oomguard-daemon-host-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemons():
    started: list[HostDaemon] = []
    yield started
    for d in started:
        d.stop(signal.SIGKILL)


@pytest.fixture
def nobody_sleeper():
    """A live process of nobody's that ignores SIGTERM (ignored signals survive exec)."""
    p = subprocess.Popen(AS_NOBODY + ["sh", "-c", "trap '' TERM; exec sleep 300"])
    wait_for(lambda: Path(f"/proc/{p.pid}/comm").read_text().strip() == "sleep", timeout=10)
    yield p
    p.kill()
    p.wait()


def seed_runs(state: Path, live_pid: int | None = None, dead: int = 0) -> list[Run]:
    """runs.json as the broker would have left it: one active run of nobody's
    (``live_pid``), ended runs of nobody and of uid 1000, and ``dead`` runs
    recorded active whose processes are long gone (the reaper ends them)."""
    reg = RunRegistry(state / "runs.json")
    now = time.time()
    runs = []
    if live_pid is not None:
        runs.append(Run(reg.new_id(), NOBODY, "nobody", live_pid, procfs.starttime_of(live_pid), now,
                        "sleep 300", None))
    runs.append(Run(reg.new_id(), NOBODY, "nobody", 999_999, 1, now - 600, "nobody-import.php", None,
                    ended=now - 500, exit_status=0, end_reason="exited"))
    runs.append(Run(reg.new_id(), 1000, "u1000", 999_998, 1, now - 400, "php secret-import.php --token=hunter2",
                    None, ended=now - 300, exit_status=-9, end_reason="killed by healer"))
    for i in range(dead):
        runs.append(Run(reg.new_id(), 1000, "u1000", 999_000 - i, 1, now - 60, f"dead run {i}", None))
    for r in runs:
        reg.add(r)
    return runs


def seed_events(db: Path) -> None:
    """OOM kills as oomwatch stores them: one of nobody's, one of uid 1000's,
    and a healer decision that names nobody (root's only)."""
    with EventStore(str(db), 30 * 86400, 100_000) as store:
        now = time.time()
        store.add("oom_kill", {"victim_pid": 4242, "victim_comm": "nobody-proc", "victim_uid": NOBODY,
                               "oom_memcg": "/x", "protected_runs": []}, ts=now - 120, uids=[NOBODY])
        store.add("oom_kill", {"victim_pid": 4343, "victim_comm": "php-fpm8.2", "victim_uid": 33,
                               "oom_memcg": "/oomguard.app",
                               "protected_runs": [{"id": 3, "user": "u1000", "uid": 1000}]},
                  ts=now - 110, uids=[33, 1000])
        store.add("healer", {"action": "restart", "service": "nginx"}, ts=now - 100, uids=[])


@pytest.fixture
def daemon(base, daemons, nobody_sleeper):
    d = HostDaemon(base)
    d.write_config()
    d.state.mkdir()
    seed_runs(d.state, live_pid=nobody_sleeper.pid)
    seed_events(d.db)
    daemons.append(d)
    return d.start()


def protect_flood(sock: str, stop: threading.Event, acked: list[int]) -> None:
    """Protect requests as root, refused by the default allow-list: each refusal
    is a queued event."""
    while not stop.is_set():
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(sock)
                s.sendall(b'{"op": "protect"}\n')
                reply = json.loads(s.makefile("rb").readline() or b"{}")
            if reply.get("ok") is False and "regular login users" in reply.get("error", ""):
                acked.append(1)
        except (OSError, ValueError):
            time.sleep(0.01)


# ---------------------------------------------------------------- the socket ops


@pytest.mark.parametrize(
    "fields, error",
    [
        ({"since": "1h"}, "since must be a number"),
        ({"since": [1]}, "since must be a number"),
        ({"since": {"t": 1}}, "since must be a number"),
        ({"kinds": "oom_kill"}, "kinds must be a list of strings"),
        ({"kinds": [1, 2]}, "kinds must be a list of strings"),
        ({"kinds": {"oom_kill": 1}}, "kinds must be a list of strings"),
        ({"limit": 0}, "limit must be an integer from 1 to 100000"),
        ({"limit": -5}, "limit must be an integer from 1 to 100000"),
        ({"limit": 100_001}, "limit must be an integer from 1 to 100000"),
        ({"limit": "10"}, "limit must be an integer from 1 to 100000"),
        ({"limit": 2.5}, "limit must be an integer from 1 to 100000"),
        ({"limit": None}, "limit must be an integer from 1 to 100000"),
    ],
)
def test_events_with_malformed_fields_gets_a_clear_refusal(daemon, fields, error):
    reply = daemon.request("events", **fields)
    assert reply == {"ok": False, "error": reply["error"]} and error in reply["error"]
    assert daemon.request("events", limit=1)["ok"] is True  # and it serves on


@pytest.mark.parametrize("raw", [b'{"op": "events", "since": true}\n', b'{"op": "events", "limit": true}\n',
                                 b'{"op": "events", "since": NaN}\n'])
def test_events_refuses_booleans_and_nan(daemon, raw):
    assert daemon.request("events", raw=raw)["ok"] is False


def test_events_cli_refusals_are_one_line_and_exit_1(daemon):
    r = daemon.cli("events", "--limit", "0")
    assert r.returncode == 1 and r.stderr.strip() == "oomguard: limit must be an integer from 1 to 100000"
    assert r.stdout == ""


def test_events_cli_bad_since_is_a_clear_error(daemon):
    r = daemon.cli("events", "--since", "yesterday")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--since" in r.stderr


def test_events_are_private_to_the_uids_they_name(daemon):
    mine = daemon.cli_json("events", nobody=True)
    root = daemon.cli_json("events")
    assert mine and all(NOBODY in e["uids"] for e in mine)
    comms = {e["data"].get("victim_comm") for e in mine if e["kind"] == "oom_kill"}
    assert comms == {"nobody-proc"}  # not uid 1000's kill
    assert not any(e["kind"] == "healer" and e["data"].get("action") == "restart" for e in mine)
    # root sees everything, including what names nobody and what names no one
    assert {"nobody-proc", "php-fpm8.2"} <= {e["data"].get("victim_comm") for e in root}
    assert any(e["kind"] == "healer" and e["data"].get("action") == "restart" for e in root)
    assert {e["id"] for e in mine} <= {e["id"] for e in root}
    # --kind filters, and privacy still holds
    kills = daemon.cli_json("events", "--kind", "oom_kill", nobody=True)
    assert [e["data"]["victim_comm"] for e in kills] == ["nobody-proc"]


def test_runs_are_private_to_their_owner(daemon, nobody_sleeper):
    mine = daemon.cli_json("runs", "--all", nobody=True)
    assert {r["uid"] for r in mine} == {NOBODY} and len(mine) == 2
    active = daemon.cli_json("runs", nobody=True)
    assert [(r["pid"], r["ended"]) for r in active] == [(nobody_sleeper.pid, None)]
    everything = daemon.cli_json("runs", "--all")
    assert {r["uid"] for r in everything} == {NOBODY, 1000}
    table = daemon.cli("runs", "--all", nobody=True)
    assert table.returncode == 0 and "secret-import" not in table.stdout and "nobody-import.php" in table.stdout


def test_status_shows_a_user_only_their_own(daemon, nobody_sleeper):
    mine = daemon.cli_json("status", nobody=True)
    assert [r["pid"] for r in mine["runs"]] == [nobody_sleeper.pid]
    assert [e["data"]["victim_comm"] for e in mine["last_oom_kills"]] == ["nobody-proc"]
    assert all(p["uid"] == NOBODY for p in mine["protected"])
    root = daemon.cli_json("status")
    assert {e["data"]["victim_comm"] for e in root["last_oom_kills"]} >= {"nobody-proc", "php-fpm8.2"}
    assert root["daemon"]["pid"] == daemon.proc.pid and root["healer"]["checks"]["shop"]["kind"] == "tcp"


def test_kill_run_of_another_users_run_is_refused_as_unknown_and_the_id_validated(daemon, nobody_sleeper):
    r = daemon.cli("kill-run", "3", nobody=True)  # uid 1000's run: nobody learns nothing of it
    assert r.returncode == 1 and r.stderr.strip() == "oomguard: no run 3 of yours"
    assert daemon.cli("kill-run", "999", nobody=True).stderr.strip() == "oomguard: no run 999 of yours"
    assert nobody_sleeper.poll() is None
    for fields, error in [({}, "integer id"), ({"id": "1"}, "integer id"), ({"id": True}, "integer id"),
                          ({"id": 1.0}, "integer id"), ({"id": 999}, "no run 999"),
                          ({"id": 2}, "run 2 already ended (exited)")]:
        reply = daemon.request("kill-run", **fields)
        assert reply["ok"] is False and error in reply["error"], (fields, reply)
    assert nobody_sleeper.poll() is None


def test_the_owner_may_stop_their_own_run(daemon, nobody_sleeper):
    r = daemon.cli("kill-run", "1", nobody=True)
    assert r.returncode == 0, r.stderr
    assert "run 1 (nobody: sleep 300) stopped" in r.stdout
    assert nobody_sleeper.wait(10) == -signal.SIGKILL
    stopped = [e for e in daemon.cli_json("events", "--kind", "healer") if e["data"].get("run") == 1]
    assert stopped and "stopped by its owner" in json.dumps(stopped[-1]["data"])


def test_kill_run_as_root_ends_the_run_after_sigterm_is_ignored(daemon, nobody_sleeper):
    r = daemon.cli("kill-run", "1")
    assert r.returncode == 0, r.stderr
    assert "run 1 (nobody: sleep 300) stopped" in r.stdout
    assert nobody_sleeper.wait(10) == -signal.SIGKILL  # TERM ignored, then KILL after term_timeout

    def ended():
        run = next(x for x in daemon.cli_json("runs", "--all") if x["id"] == 1)
        return run if run["ended"] else None

    run = wait_for(ended)
    assert run["end_reason"] == "killed by healer"
    killed = [e for e in daemon.cli_json("events", "--kind", "healer", nobody=True)
              if e["data"].get("action") == "killed"]
    assert killed and killed[-1]["data"]["run"] == 1 and killed[-1]["data"]["pids"] == [nobody_sleeper.pid]


def test_the_broker_serves_others_while_a_kill_run_waits(daemon, nobody_sleeper):
    killer = threading.Thread(target=daemon.request, args=("kill-run",), kwargs={"id": 1, "timeout": 30})
    killer.start()
    try:
        time.sleep(0.3)  # the kill-run is now waiting out the 2 s term_timeout
        t0 = time.monotonic()
        assert daemon.request("ping")["ok"]
        assert time.monotonic() - t0 < 1.0
    finally:
        killer.join(30)


def test_status_does_not_show_other_users_runs_through_the_healer(daemon, nobody_sleeper):
    assert daemon.cli("kill-run", "1").returncode == 0

    def mentions_run_1(healer: dict) -> bool:
        return any(a.get("run") == 1 or "sleep 300" in json.dumps(a) for a in healer.get("last_actions", []))

    assert mentions_run_1(daemon.cli_json("status")["healer"])  # root sees the healer's action
    other = subprocess.run(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups",
                            OOMGUARD, "--config", str(daemon.config), "status", "--json"],
                           capture_output=True, text=True, timeout=60, env=daemon.env())
    assert other.returncode == 0, other.stderr
    healer = json.loads(other.stdout)["healer"]
    assert not mentions_run_1(healer) and 1 not in healer.get("killed_runs", [])
    assert "sleep 300" not in other.stdout


def test_metrics_endpoint_counts_refusals_and_downtime(daemon):
    for _ in range(3):
        assert daemon.request("protect")["ok"] is False  # root is not a login user

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def value(text: str, name: str) -> float | None:
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return None

    text = wait_for(lambda: (t := scrape()) and (value(t, "oomguard_healer_downtime_seconds") or 0) > 0 and t)
    assert value(text, 'oomguard_protect_refusals_total{reason="not_allowed"}') == 3
    assert value(text, "oomguard_protect_grants_total") == 0
    assert "oomguard_oom_kills" in text and "oomguard_app_memory_current_bytes" in text


# ---------------------------------------------------------------- doctor and config


def test_doctor_on_this_host(daemon):
    r = daemon.cli("doctor")
    assert "Traceback" not in r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith("OK") and "config" in line and "validates" in line for line in lines)
    assert any(line.startswith("OK") and "socket" in line and "reachable by every user" in line for line in lines)
    # cgroup v1 here: an error, so the exit status says something is wrong
    assert any(line.startswith("ERROR") and "cgroups" in line and "not cgroup v2" in line for line in lines)
    assert any(line.startswith("WARN") and "capability" in line and "CAP_SYS_RESOURCE" in line for line in lines)
    assert r.returncode == 1
    r = daemon.cli("doctor", "--json")
    assert r.returncode == 1
    findings = json.loads(r.stdout)
    assert {f["level"] for f in findings} <= {"ok", "warn", "error"}
    assert {f["topic"] for f in findings} >= {"config", "socket", "cgroups", "oom-killers", "events"}


def test_doctor_flags_socket_permissions(daemon):
    sock, parent = Path(daemon.sock), Path(daemon.sock).parent
    try:
        sock.chmod(0o600)
        out = daemon.cli("doctor").stdout
        assert "has mode 600; allowed users need 666" in out
        sock.chmod(0o666)
        parent.chmod(0o777)
        out = daemon.cli("doctor").stdout
        assert f"{parent} is writable by others" in out
        parent.chmod(0o700)
        assert f"{parent} is not searchable by others" in daemon.cli("doctor").stdout
    finally:
        sock.chmod(0o666)
        parent.chmod(0o755)


def test_doctor_reports_an_invalid_config_without_a_traceback(base):
    bad = base / "bad.toml"
    bad.write_text('[healer]\ngrace = "soon"\n')
    r = subprocess.run([OOMGUARD, "--config", str(bad), "doctor"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert any(line.startswith("ERROR") and "healer.grace" in line for line in r.stdout.splitlines())


@pytest.mark.parametrize(
    "text, key",
    [
        ('[healer]\n[[healer.window]]\nfrom = "25:00"\nto = "07:00"\ngrace = "5m"\n', "healer.window[0].from"),
        ('[protect]\nallow_users = ["no-such-user-xyz"]\n', "protect.allow_users[0]"),
        ('[metrics]\nlisten = "nowhere"\n', "metrics.listen"),
        ('[events]\nmax_rows = 5\n', "events.max_rows"),
        ('[protect]\nsokcet = "/run/x.sock"\n', "protect.sokcet"),
        ('[healer\n', "invalid TOML"),
    ],
)
def test_config_check_names_the_key_and_exits_2(base, text, key):
    bad = base / "bad.toml"
    bad.write_text(text)
    r = subprocess.run([OOMGUARD, "config", "check", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    assert r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"oomguard: {bad}: ") and key in r.stderr and len(r.stderr.splitlines()) == 1


def test_config_check_accepts_a_valid_file(base):
    d = HostDaemon(base)
    d.write_config()
    r = subprocess.run([OOMGUARD, "config", "check", str(d.config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"{d.config}: OK"
    missing = subprocess.run([OOMGUARD, "config", "check", str(base / "nope.toml")], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "no such config file" in missing.stderr


# ---------------------------------------------------------------- start-up refusals


def test_daemon_refuses_an_invalid_config_with_exit_2(base):
    d = HostDaemon(base)
    d.write_config(extra='\n[layout]\napp_slice = "shop"\n')
    r = subprocess.run([OOMGUARD, "--config", str(d.config), "daemon"], capture_output=True, text=True,
                       timeout=60, env=d.env())
    assert r.returncode == 2
    assert r.stderr.strip() == f"oomguard: {d.config}: layout.app_slice: must end in .slice"
    assert not Path(d.sock).exists() and not d.db.exists()  # nothing was started


def test_second_daemon_does_not_take_over_a_live_socket(daemon):
    second = HostDaemon(daemon.base / "second")
    second.base.mkdir()
    # the same socket, everything else its own
    second.config.write_text(config_text(second.base, sock=daemon.sock, metrics_port=second.metrics_port,
                                         closed_port=second.closed_port))
    with open(second.log, "ab") as log:
        rc = subprocess.run([OOMGUARD, "--config", str(second.config), "daemon"], stdout=log,
                            stderr=subprocess.STDOUT, timeout=60, env=second.env()).returncode
    assert rc == 1
    assert f"cannot start: another daemon is already serving {daemon.sock}" in second.log_text()
    assert Path(daemon.sock).is_socket()
    assert daemon.request("ping") == {"ok": True, "uid": 0}
    assert daemon.proc.poll() is None


def test_a_stale_socket_is_replaced(base, daemons):
    d = HostDaemon(base)
    d.write_config()
    Path(d.sock).parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(d.sock)  # bound, never listening: what a SIGKILLed daemon leaves
    stale.close()
    daemons.append(d)
    d.start()
    assert d.request("ping")["ok"]


# ---------------------------------------------------------------- SIGHUP


def test_sighup_keeps_the_old_config_when_the_new_one_is_invalid(daemon):
    """Observable without CAP_SYS_RESOURCE: nobody refused by the allow-list
    vs nobody allowed, then failing at the -1000 write."""

    def nobody_protect() -> str:
        code = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
                "s.sendall(b'{\"op\": \"protect\"}\\n'); print(s.makefile().readline())")
        r = subprocess.run(AS_NOBODY + [sys.executable, "-c", code, daemon.sock], capture_output=True,
                           text=True, timeout=60, check=True)
        return json.loads(r.stdout)["error"]

    assert "may not request protection" in nobody_protect()
    good = daemon.config.read_text()
    daemon.config.write_text(good.replace("[protect]\n", '[protect]\nallow_users = ["nobody", 12]\nbogus = 1\n'))
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused, keeping the old config" in daemon.log_text())
    assert "protect.bogus: unknown key" in daemon.log_text()
    assert daemon.proc.poll() is None
    assert "may not request protection" in nobody_protect()  # old allow-list still in force

    daemon.config.write_text(good.replace("[protect]\n", '[protect]\nallow_users = ["nobody"]\n'))
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config reloaded from" in daemon.log_text())
    assert "could not set oom_score_adj" in nobody_protect()  # allowed now; this host lacks the capability
    assert daemon.request("ping")["ok"]


# ---------------------------------------------------------------- restarts


def test_restart_mid_incident_keeps_the_downtime_clock(daemon):
    before = wait_for(lambda: (h := daemon.cli_json("status")["healer"])["down"] and h)
    assert before["phase"] == "waiting" and before["down_since"] is not None
    time.sleep(0.5)
    assert daemon.stop(signal.SIGTERM) == 0
    gap_start = time.monotonic()
    time.sleep(1.0)
    daemon.start()
    after = daemon.cli_json("status")["healer"]
    gap = time.monotonic() - gap_start
    assert after["down"] is True and after["phase"] == "waiting"
    assert after["down_since"] == before["down_since"]  # the same incident, not a new one
    assert after["downtime"] >= before["downtime"] + gap - 0.5
    assert after["time_left"] <= before["time_left"] - gap + 0.5
    assert "resuming incident" in daemon.log_text()
    # one "down" decision for the whole incident
    downs = [e for e in daemon.cli_json("events", "--kind", "healer") if e["data"].get("action") == "down"]
    assert len(downs) == 1


def test_sigkill_at_random_moments_leaves_a_sound_db_and_registry(base, daemons, nobody_sleeper):
    d = HostDaemon(base)
    d.write_config()
    d.state.mkdir()
    seeded = seed_runs(d.state, live_pid=nobody_sleeper.pid, dead=40)
    seed_events(d.db)
    daemons.append(d)
    rng = random.Random(os.getpid())
    total_acked = total_refusals = 0
    for _ in range(4):
        d.proc = d.launch()  # no wait: a kill may land during start-up too
        stop, acked = threading.Event(), []
        flood = threading.Thread(target=protect_flood, args=(d.sock, stop, acked))
        flood.start()
        time.sleep(rng.uniform(0.2, 2.0))
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
        stop.set()
        flood.join(10)
        total_acked += len(acked)

        with sqlite3.connect(d.db) as db:  # a fresh reader: recovers the WAL as the daemon would
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            # repeats of one uid's refusal for one reason are counted on one row
            (refusals,) = db.execute(
                "SELECT COALESCE(SUM(COALESCE(json_extract(data, '$.count'), 1)), 0) "
                "FROM events WHERE kind = 'refusal'"
            ).fetchone()
            (orphans,) = db.execute(
                "SELECT COUNT(*) FROM event_uids v LEFT JOIN events e ON e.id = v.event_id WHERE e.id IS NULL"
            ).fetchone()
        # refusals are written off the broker's thread (a locked or full db
        # must not stall it), so a SIGKILL may take the last few queued ones;
        # what was committed is whole
        assert orphans == 0
        total_refusals = refusals  # cumulative: one db across restarts
        data = json.loads((d.state / "runs.json").read_text())  # whole, never torn
        assert sorted(r["id"] for r in data["runs"]) == [r.id for r in seeded]
        reg = RunRegistry(d.state / "runs.json")
        assert [r.id for r in reg.all()] == [r.id for r in seeded]
        assert reg.get(1).active and reg.get(1).pid == nobody_sleeper.pid

    assert total_acked > 0 and total_refusals > 0
    d.start()  # and it starts again on what the last SIGKILL left
    status = d.cli_json("status")
    assert status["daemon"]["pid"] == d.proc.pid
    runs = d.cli_json("runs", "--all")
    assert [r["id"] for r in runs] == [r.id for r in seeded]
    assert next(r for r in runs if r["id"] == 1)["ended"] is None  # the live run is still active
    wait_for(lambda: all(r["ended"] for r in d.cli_json("runs", "--all") if r["id"] != 1))  # the dead ones reaped
    assert len(d.cli_json("events", "--kind", "oom_kill")) >= 2
    # the incident in force is one that was recorded (its "down" event is
    # committed before the healer's state file names it)
    healer = wait_for(lambda: (h := d.cli_json("status")["healer"])["down"] and h)
    incidents = {e["data"]["since"] for e in d.cli_json("events", "--kind", "healer")
                 if e["data"].get("action") == "down"}
    assert healer["down_since"] in incidents


# ---------------------------------------------------------------- hooks


def test_hooks_get_each_stored_event_and_a_hanging_one_delays_nothing(base, daemons):
    from test_notify import Receiver

    receiver = Receiver()
    try:
        d = HostDaemon(base)
        d.write_config(extra=f"""
[[notify.exec]]
command = ["/bin/sleep", "3600"]
user = "nobody"
kinds = ["*"]
timeout = "1h"

[[notify.webhook]]
url = "{receiver.url}"
kinds = ["healer"]
""")
        daemons.append(d.start())
        # the closed health port starts an incident at once: its "down" event
        # reaches the webhook although the exec hook before it hangs
        _headers, raw = receiver.wait(1)[0]
        event = json.loads(raw)
        assert event["kind"] == "healer" and event["data"]["action"] == "down"
        stored = [e for e in d.cli_json("events", "--kind", "healer") if e["data"].get("action") == "down"]
        assert [e["id"] for e in stored] == [event["id"]]
        for _ in range(20):  # the broker keeps answering while the hook hangs
            assert d.request("ping", timeout=30)["ok"]
        hung = wait_for(lambda: [p.pid for p in procfs.iter_processes() if p.comm == "sleep" and p.uid == NOBODY],
                        timeout=60)  # the exec hook runs as nobody  # fmt: skip
        assert d.stop() == 0  # and stops with the daemon, hook and all
        assert not any(Path(f"/proc/{pid}").exists() for pid in hung)
    finally:
        receiver.close()


def test_each_stored_event_is_logged_once_and_a_refusal_flood_once(daemon):
    for _ in range(5):  # root is no login user: five refusals, coalesced on one row
        assert daemon.request("protect")["ok"] is False
    wait_for(lambda: "event refusal: " in daemon.log_text())
    wait_for(lambda: "event healer: " in daemon.log_text())  # the incident's "down"
    wait_for(lambda: [e["data"]["count"] for e in daemon.cli_json("events", "--kind", "refusal")] == [5])
    assert daemon.log_text().count("event refusal: ") == 1


def test_a_runs_report_gives_its_life_its_kills_and_its_end(daemon, nobody_sleeper):
    with EventStore(str(daemon.db), 30 * 86400, 100_000) as store:  # a kill while run 1 lives
        store.add("oom_kill", {"victim_pid": 5151, "victim_comm": "mysqld-copy", "victim_uid": 1000,
                               "oom_memcg": "/oomguard.app", "protected_runs": [{"id": 1, "user": "nobody",
                                                                                 "uid": NOBODY}]},
                  uids=[1000, NOBODY])  # fmt: skip
    mine = daemon.cli_json("runs", "1", nobody=True)
    assert mine["running"] and mine["ended_by"] is None and mine["run"]["command"] == "sleep 300"
    (kill,) = mine["oom_kills"]
    assert kill["victim"] == "another user's process" and "victim_comm" not in kill  # not nobody's to see
    assert daemon.cli_json("runs", "1")["oom_kills"][0]["victim_comm"] == "mysqld-copy"  # root sees it
    text = daemon.cli("runs", "1", nobody=True).stdout
    assert "running for" in text and "oom kills   1 while it ran" in text
    ended = daemon.cli_json("runs", "3")
    assert ended["ended_by"].startswith("the healer") and ended["duration"] == pytest.approx(100, abs=1)
    r = daemon.cli("runs", "3", nobody=True)
    assert r.returncode == 1 and r.stderr.strip() == "oomguard: no run 3 of yours"


def test_runs_that_ended_while_no_daemon_watched_say_so_before_it_serves(base, daemons, nobody_sleeper):
    d = HostDaemon(base)
    d.write_config()
    d.state.mkdir()
    seed_runs(d.state, live_pid=nobody_sleeper.pid, dead=3)
    daemons.append(d.start())
    runs = {r["id"]: r for r in d.cli_json("runs", "--all")}  # the first answer already knows
    dead = [r for r in runs.values() if r["command"].startswith("dead run")]
    assert len(dead) == 3 and all(r["ended"] and r["end_reason"] == "ended while the daemon was down"
                                  and r["exit_status"] is None for r in dead)  # fmt: skip
    assert runs[1]["ended"] is None  # the live one is re-adopted
    assert runs[2]["end_reason"] == "exited"  # what ended before is left as it was


def test_a_restart_records_grants_a_crash_lost_once_and_announces_no_end_twice(base, daemons, nobody_sleeper):
    """A grant's event is written off the broker's loop and a run's end is
    announced before runs.json is flushed: a SIGKILL in either window must
    leave each run with exactly one grant and at most one run_end event."""
    d = HostDaemon(base)
    d.write_config()
    d.state.mkdir()
    seeded = seed_runs(d.state, live_pid=nobody_sleeper.pid, dead=2)
    dead = [r.id for r in seeded if r.command.startswith("dead run")]
    with EventStore(str(d.db), 30 * 86400, 100_000) as store:
        store.add("grant", {"id": seeded[0].id}, uids=[NOBODY])  # this one's grant made it to disk
        store.add("run_end", {"id": dead[0]}, uids=[1000])  # announced; the crash came before the flush
    for _ in range(2):
        daemons.append(d.start())
        counts: dict[str, dict[int, int]] = {"grant": {}, "run_end": {}}
        for e in d.cli_json("events", "--since", "1d"):
            if e["kind"] in counts:
                counts[e["kind"]][e["data"]["id"]] = counts[e["kind"]].get(e["data"]["id"], 0) + 1
        assert counts["grant"] == {r.id: 1 for r in seeded}
        assert counts["run_end"] == dict.fromkeys(dead, 1)
        d.stop(signal.SIGKILL)
    with EventStore(str(d.db), 30 * 86400, 100_000) as store:
        late = [e for e in store.query(kinds=["grant"]) if e["data"].get("recorded_late")]
    assert sorted(e["data"]["id"] for e in late) == [r.id for r in seeded[1:]]
    assert all(e["ts"] == next(r.started for r in seeded if r.id == e["data"]["id"]) for e in late)


def test_a_user_changes_an_allowed_setting_and_it_is_an_event(base, daemons):
    d = HostDaemon(base)
    d.write_config(protect_extra='user_settings = ["permissive"]')
    daemons.append(d.start())
    r = d.cli("settings", nobody=True)
    assert r.returncode == 0 and r.stdout.startswith("permissive = off"), r
    r = d.cli("settings", "permissive", "on", nobody=True)
    assert r.returncode == 0 and r.stdout.startswith("permissive = on"), r
    assert d.cli_json("settings", nobody=True)["permissive"]["value"] is True
    ev = wait_for(lambda: d.cli_json("events", "--kind", "setting", nobody=True))
    assert [(e["data"]["user"], e["data"]["name"], e["data"]["old"], e["data"]["new"]) for e in ev] == [
        ("nobody", "permissive", False, True)]  # fmt: skip
    assert d.cli_json("settings")["permissive"]["value"] is False  # root's own are apart


def test_a_setting_root_does_not_allow_is_refused_and_nothing_changes(daemon):
    r = daemon.cli("settings", "permissive", "on", nobody=True)
    assert r.returncode == 1 and "not a setting you may change (allowed: none)" in r.stderr
    assert not (daemon.state / "settings.json").exists()
    assert daemon.request("settings", name=["x"], value="on")["error"].startswith("settings: name")
