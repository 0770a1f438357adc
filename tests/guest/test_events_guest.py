"""See what happened (issue 5), against the real kernel: OOM kills parsed from
/dev/kmsg and attributed to protected runs, `oomguard top --cgroup` against
the kernel's own choice, privacy per user, restarts without duplicates,
metrics, `status`, and SIGHUP.

One daemon for the module, with its own config: the app cgroup is a plain
cgroup made here (no systemd in the guest), metrics on a loopback port, and
the policy not enforced, so that the oom_score_adj values this module sets
stay as set. Tests run in file order; the restart test goes last.

Kernel OOM reports from earlier guest tests of the same boot are in the ring
too, so counts are taken relative to what was there, and events are picked
by victim pid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon_fixture import BIN, RunningDaemon, wait_for

PY = sys.executable
OOMGUARD = str(BIN / "oomguard")
OOM_PROTECT = str(BIN / "oom-protect")
CG_ROOT = Path("/sys/fs/cgroup")
APP = "oomguard-ev-app"  # the app cgroup: [layout] app_cgroup
APP_LIMIT = 128 << 20
SOCK = "/run/oomguard-ev/protect.sock"


# ---------------------------------------------------------------- helpers



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_text(base: Path, port: int, allow: tuple[str, ...], protect_extra: str = "") -> str:
    users = ", ".join(f'"{u}"' for u in allow)
    return f"""
[daemon]
state_dir = "{base / 'state'}"
log_level = "debug"

[protect]
socket = "{SOCK}"
allow_users = [{users}]
{protect_extra}

[events]
db = "{base / 'state' / 'events.db'}"

[metrics]
listen = "127.0.0.1:{port}"

[policy]
enforce = false

[layout]
app_cgroup = "{APP}"
"""


@dataclass
class Guest:
    """The module's daemon, restartable on the same config and state."""

    base: Path
    port: int
    d: RunningDaemon | None = None

    def start(self) -> RunningDaemon:
        log = self.base / "daemon.log"
        proc = subprocess.Popen([OOMGUARD, "--config", str(self.base / "oomguard.toml"), "daemon"],
                                stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # fmt: skip
        self.d = RunningDaemon(proc, self.base / "oomguard.toml", SOCK, self.base / "state", log)
        deadline = time.monotonic() + 90
        while not self._pings():
            if proc.poll() is not None or time.monotonic() > deadline:
                self.d.stop()
                raise RuntimeError(f"the daemon did not start:\n{self.d.log_text()}")
            time.sleep(0.1)
        return self.d

    @staticmethod
    def _pings() -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(SOCK)
                s.sendall(b'{"op": "ping"}\n')
                return b'"ok": true' in s.makefile("rb").readline()
        except OSError:
            return False

    def write_config(self, allow: tuple[str, ...], protect_extra: str = "") -> None:
        (self.base / "oomguard.toml").write_text(config_text(self.base, self.port, allow, protect_extra))

    def root_json(self, *args: str):
        r = subprocess.run([OOMGUARD, *args, "--json"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OOMGUARD_SOCKET": SOCK})
        assert r.returncode == 0, (args, r.stderr)
        return json.loads(r.stdout)

    def kills(self) -> list[dict]:
        return self.root_json("events", "--kind", "oom_kill")


def user_json(user, *args: str):
    r = user.run([OOMGUARD, *args, "--json"], env=user.env(OOMGUARD_SOCKET=SOCK))
    assert r.returncode == 0, (user.name, args, r.stderr)
    return json.loads(r.stdout)


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def adj(pid: int) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


def cg_write(cg: Path, name: str, value: object) -> None:
    (cg / name).write_text(str(value))


def cg_destroy(cg: Path) -> None:
    if not cg.exists():
        return
    cg_write(cg, "cgroup.kill", 1)
    wait_for(lambda: "populated 0" in (cg / "cgroup.events").read_text(), timeout=30, interval=0.05)
    for sub in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        sub.rmdir()
    cg.rmdir()


def in_cgroup(cg: Path, argv: list[str], **kw) -> subprocess.Popen:
    """Start argv inside cg from birth (its memory is charged there)."""
    p = subprocess.Popen(["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cg / "cgroup.procs"), *argv], **kw)
    wait_for(lambda: p.pid in [int(x) for x in (cg / "cgroup.procs").read_text().split()] or p.poll() is not None,
             timeout=30, interval=0.01)
    return p


def kill_event(g: Guest, pid: int, timeout: float = 60) -> dict:
    def find():
        return next((e for e in g.kills() if e["data"]["victim_pid"] == pid), None)

    return wait_for(find, timeout=timeout, interval=0.5)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def guest(unpriv_user, other_user):
    base = Path(tempfile.mkdtemp(prefix="oomguard-ev-", dir="/tmp"))
    base.chmod(0o755)
    app = CG_ROOT / APP
    app.mkdir()
    cg_write(app, "memory.max", APP_LIMIT)
    cg_write(app, "memory.swap.max", 0)
    g = Guest(base, free_port())
    g.write_config(("shopuser", "otheruser"))
    g.start()
    yield g
    if g.d is not None:
        g.d.stop()
    cg_destroy(app)
    shutil.rmtree(base, ignore_errors=True)


@dataclass
class ProtectedRun:
    proc: subprocess.Popen
    run: dict


@pytest.fixture(scope="module")
def protected_run(guest, unpriv_user):
    """shopuser's `oom-protect sleep 600`, started in the app cgroup and alive
    for the whole module."""
    p = in_cgroup(CG_ROOT / APP, unpriv_user.argv([OOM_PROTECT, "sleep", "600"]),
                  env=unpriv_user.env(OOMGUARD_SOCKET=SOCK))
    wait_for(lambda: comm(p.pid) == "sleep", timeout=60)
    assert adj(p.pid) == -1000
    run = next(r for r in guest.root_json("runs") if r["pid"] == p.pid)
    yield ProtectedRun(p, run)
    p.kill()
    p.wait()


@dataclass
class Kill:
    pid: int
    event: dict


@pytest.fixture(scope="module")
def app_kill(guest, protected_run, unpriv_user) -> Kill:
    """A real OOM kill in the app cgroup: shopuser's unprotected `tail /dev/zero`
    grows until the kernel kills it, while shopuser's protected run sleeps."""
    victim = in_cgroup(CG_ROOT / APP, unpriv_user.argv(["tail", "/dev/zero"]), stderr=subprocess.DEVNULL)
    assert victim.wait(timeout=120) == -signal.SIGKILL
    assert protected_run.proc.poll() is None  # the protected run is spared
    return Kill(victim.pid, kill_event(guest, victim.pid))


# ---------------------------------------------------------------- 1. a real OOM kill, parsed and attributed


def test_a_real_oom_kill_is_a_parsed_and_attributed_event(app_kill, protected_run, unpriv_user):
    d = app_kill.event["data"]
    assert app_kill.event["kind"] == "oom_kill"
    assert (d["victim_pid"], d["victim_comm"], d["victim_uid"]) == (app_kill.pid, "tail", unpriv_user.uid)
    assert d["constraint"] == "CONSTRAINT_MEMCG" and d["oom_memcg"] == f"/{APP}" and d["task_memcg"] == f"/{APP}"
    assert d["oom_score_adj"] == 0 and d["complete"] is True
    assert d["anon_rss_kb"] > (APP_LIMIT >> 10) // 2 and d["total_vm_kb"] >= d["anon_rss_kb"]
    assert d["invoker_comm"] == "tail"
    # attribution: the protected run alive at that moment, by id and user
    run = protected_run.run
    assert [(r["id"], r["user"], r["uid"]) for r in d["protected_runs"]] == [(run["id"], "shopuser", unpriv_user.uid)]
    assert unpriv_user.uid in app_kill.event["uids"]
    # and the kernel's wall time, within the last minutes
    assert time.time() - 600 < app_kill.event["ts"] <= time.time() + 5


# ---------------------------------------------------------------- 2. top --cgroup names the kernel's victim


RANKED = textwrap.dedent("""
    import os, sys, time
    ready, go = sys.argv[1], sys.argv[2]
    # name: (MiB held, oom_score_adj). Chosen so that the victim has neither
    # the most memory nor the highest adjustment.
    plan = {"a": (20, 0), "b": (5, 400), "d": (50, 250), "c": (60, -300)}
    open("/proc/self/oom_score_adj", "w").write("-1000")  # the parent is the trigger: never a victim
    kids = {}
    for name, (mib, adj) in plan.items():
        pid = os.fork()
        if pid == 0:
            open("/proc/self/oom_score_adj", "w").write(str(adj))
            held = b"\\1" * (mib << 20)
            open(f"{ready}.{name}", "w").close()
            time.sleep(600)
            os._exit(0)
        kids[name] = pid
    print(" ".join(f"{n}={p}" for n, p in kids.items()), flush=True)
    while not os.path.exists(go):
        time.sleep(0.05)
    chunks = [b"\\2" * (1 << 20) for _ in range(64)]  # past the limit: one kill frees enough
    print("trigger done", flush=True)
    time.sleep(600)
""")


def test_top_cgroup_names_first_the_process_the_kernel_kills(guest, cgroup, kmsg, tmp_path):
    cgroup.write("memory.max", 200 << 20)
    cgroup.write("memory.swap.max", 0)
    ready, go = str(tmp_path / "ready"), tmp_path / "go"
    parent = cgroup.popen([PY, "-c", RANKED, ready, str(go)], stdout=subprocess.PIPE, text=True)
    kids = dict(kv.split("=") for kv in parent.stdout.readline().split())
    kids = {n: int(p) for n, p in kids.items()}
    wait_for(lambda: all(os.path.exists(f"{ready}.{n}") for n in kids), timeout=120)

    rel = "/" + str(cgroup.path.relative_to(CG_ROOT))
    ranking = guest.root_json("top", "--cgroup", rel)
    assert ranking["cgroup"] == rel and ranking["totalpages"] == (200 << 20) // ranking["page_size"]
    entries = ranking["entries"]
    first = entries[0]
    assert first["rank"] == 1 and first["killable"]
    assert {e["pid"] for e in entries} == {parent.pid, *kids.values()}
    assert next(e for e in entries if e["pid"] == parent.pid)["killable"] is False  # -1000
    # the interesting case: not the biggest, not the highest adj
    assert first["pid"] == kids["d"], entries

    go.touch()
    m = kmsg.wait_for(r"Memory cgroup out of memory: Killed process (\d+)", timeout=120)
    assert int(m.group(1)) == first["pid"]
    assert parent.stdout.readline().strip() == "trigger done"
    # the daemon parsed the same kill, with the victim's adjustment
    d = kill_event(guest, first["pid"])["data"]
    assert d["oom_score_adj"] == 250 and d["oom_memcg"] == rel
    parent.kill()


# ---------------------------------------------------------------- 3. privacy


def test_a_user_sees_only_their_own_runs_and_events(guest, app_kill, protected_run, unpriv_user, other_user):
    # root is no login user: refused, an event that names root only
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(SOCK)
        s.sendall(b'{"op": "protect"}\n')
        assert b"not in [protect] allow_users" in s.makefile("rb").readline()
    r = other_user.run([OOM_PROTECT, "true"], env=other_user.env(OOMGUARD_SOCKET=SOCK))
    assert r.returncode == 0, r.stderr
    shop_runs = user_json(unpriv_user, "runs", "--all")
    other_runs = user_json(other_user, "runs", "--all")
    all_runs = guest.root_json("runs", "--all")
    assert shop_runs and {x["uid"] for x in shop_runs} == {unpriv_user.uid}
    assert protected_run.run["id"] in [x["id"] for x in shop_runs]
    assert other_runs and {x["uid"] for x in other_runs} == {other_user.uid}
    assert {x["id"] for x in all_runs} == {x["id"] for x in shop_runs} | {x["id"] for x in other_runs}
    # the protected run is active: shopuser sees it without --all, otheruser does not
    assert protected_run.run["id"] in [x["id"] for x in user_json(unpriv_user, "runs")]

    shop_events = user_json(unpriv_user, "events")
    other_events = user_json(other_user, "events")
    root_events = guest.root_json("events")
    assert all(unpriv_user.uid in e["uids"] for e in shop_events)
    assert all(other_user.uid in e["uids"] for e in other_events)
    assert app_kill.pid in [e["data"].get("victim_pid") for e in shop_events if e["kind"] == "oom_kill"]
    assert app_kill.pid not in [e["data"].get("victim_pid") for e in other_events]
    assert not any(e["data"].get("user") == "shopuser" for e in other_events)
    assert any(e["kind"] == "grant" and e["data"]["user"] == "otheruser" for e in other_events)
    assert not any(e["kind"] == "grant" and e["data"]["user"] == "otheruser" for e in shop_events)
    ids = {e["id"] for e in root_events}
    assert {e["id"] for e in shop_events} <= ids and {e["id"] for e in other_events} <= ids
    refused = [e for e in root_events if e["kind"] == "refusal" and e["data"]["uid"] == 0]
    assert refused and refused[-1]["uids"] == [0]
    assert refused[-1]["id"] not in {e["id"] for e in shop_events} | {e["id"] for e in other_events}


# ---------------------------------------------------------------- 4. metrics


def test_metrics_show_the_kill_grants_and_protected_processes(guest, app_kill, protected_run):
    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{guest.port}/metrics", timeout=10) as resp:
            return resp.read().decode()

    def value(text: str, pattern: str) -> float:
        m = re.search(rf"^{pattern} (\S+)$", text, re.M)
        assert m, (pattern, text)
        return float(m.group(1))

    text = wait_for(lambda: (t := scrape()) and value(t, "oomguard_protected_processes") >= 1 and t, timeout=30)
    kills = [line for line in text.splitlines() if line.startswith("oomguard_oom_kills_total{")
             and 'comm="tail"' in line and f'cgroup="/{APP}"' in line]
    assert len(kills) == 1 and float(kills[0].split()[-1]) == 1, text
    assert value(text, "oomguard_protect_grants_total") >= 2  # the sleeper and otheruser's `true`
    assert value(text, "oomguard_protected_processes") == 1  # the sleeper
    assert value(text, "oomguard_app_memory_limit_bytes") == APP_LIMIT
    assert value(text, "oomguard_app_memory_current_bytes") > 0
    assert 0 <= value(text, "oomguard_memory_pressure_some_avg10_ratio") <= 1
    assert value(text, 'oomguard_protect_refusals_total\\{reason="not_allowed"\\}') == 1  # root's, above


# ---------------------------------------------------------------- 5. status


def test_status_shows_the_app_cgroup_psi_protected_and_last_kills(guest, app_kill, protected_run, unpriv_user,
                                                                  other_user):
    s = guest.root_json("status")
    app = s["app"]
    assert app["cgroup"] == f"/{APP}" and app["max"] == APP_LIMIT and 0 < app["current"] < APP_LIMIT
    assert app["oom_kill"] >= 1 and app["oom"] >= 1
    assert set(app["pressure"]) == {"some_avg10", "full_avg10"}
    assert set(s["pressure"]) == {"some_avg10", "full_avg10"} and s["memory"]["total"] > 0
    assert protected_run.proc.pid in [p["pid"] for p in s["protected"]]
    assert protected_run.run["id"] in [r["id"] for r in s["runs"]]
    assert app_kill.pid in [e["data"]["victim_pid"] for e in s["last_oom_kills"]]
    assert s["daemon"]["pid"] == guest.d.proc.pid and s["daemon"]["process_events"] == "events"
    # otheruser's status has none of shopuser's
    o = user_json(other_user, "status")
    assert o["protected"] == [] and o["runs"] == []
    assert app_kill.pid not in [e["data"]["victim_pid"] for e in o["last_oom_kills"]]

    table = subprocess.run([OOMGUARD, "status"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OOMGUARD_SOCKET": SOCK})
    assert table.returncode == 0 and table.stderr == "", table.stderr
    lines = table.stdout.splitlines()
    assert any(line.startswith(f"app slice   /{APP}: ") and "of 128 MiB" in line for line in lines), lines
    assert any(line.startswith("pressure    memory some ") for line in lines)
    assert any(line.startswith("protected   ") and "process(es) at -1000" in line for line in lines)
    assert any(line.startswith(f"  run {protected_run.run['id']} ") and "shopuser" in line for line in lines)
    assert any(f"pid {app_kill.pid} tail (uid {unpriv_user.uid}) in /{APP}" in line for line in lines)


# ---------------------------------------------------------------- 6. SIGHUP


def test_sighup_keeps_an_invalid_config_out_and_takes_a_valid_one(guest, other_user):
    d = guest.d

    def other_protect() -> subprocess.CompletedProcess:
        return other_user.run([OOM_PROTECT, "true"], env=other_user.env(OOMGUARD_SOCKET=SOCK))

    guest.write_config(("shopuser", "otheruser"), protect_extra="max_connections = 0")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused, keeping the old config" in d.log_text(), timeout=30)
    assert "protect.max_connections: must be between 1 and 4096" in d.log_text()
    assert d.proc.poll() is None
    assert other_protect().returncode == 0  # still served, by the old config

    guest.write_config(("shopuser",))
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config reloaded from" in d.log_text(), timeout=30)
    r = other_protect()
    assert r.returncode == 125 and "not in [protect] allow_users" in r.stderr


# ---------------------------------------------------------------- 7. restarts


def test_restart_repeats_no_kill_and_picks_up_one_from_while_it_was_down(guest, cgroup, kmsg, unpriv_user,
                                                                         protected_run):
    before = guest.kills()
    assert len({e["data"]["victim_pid"] for e in before}) == len(before)  # no duplicates so far
    guest.d.stop()
    assert guest.d.proc.returncode == 0

    # an OOM kill while no daemon runs: only the kernel's ring has it
    cgroup.write("memory.max", 32 << 20)
    cgroup.write("memory.swap.max", 0)
    victim = cgroup.popen(unpriv_user.argv(["tail", "/dev/zero"]), stderr=subprocess.DEVNULL)
    assert victim.wait(timeout=120) == -signal.SIGKILL
    kmsg.wait_for(rf"Killed process {victim.pid}\b")

    restarted = time.time()
    guest.start()
    missed = kill_event(guest, victim.pid)
    after = guest.kills()
    assert len(after) == len(before) + 1, [e["data"]["victim_pid"] for e in after]
    assert [e["id"] for e in after[:-1]] == [e["id"] for e in before]
    assert (missed["data"]["victim_comm"], missed["data"]["victim_uid"]) == ("tail", unpriv_user.uid)
    assert missed["data"]["oom_memcg"] == "/" + str(cgroup.path.relative_to(CG_ROOT))
    # its time is the kernel's, not the moment the daemon read it
    assert max(e["ts"] for e in before) < missed["ts"] < restarted
    # shopuser's protected run was alive then (and still is)
    assert [r["id"] for r in missed["data"]["protected_runs"]] == [protected_run.run["id"]]

    # and once more: a second restart with nothing new adds nothing
    guest.d.stop()
    guest.start()
    time.sleep(2)  # the ring is read at once; give the follower time to go through it
    again = guest.kills()
    assert [e["id"] for e in again] == [e["id"] for e in after]
