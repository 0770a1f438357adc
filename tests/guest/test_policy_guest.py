"""Service priorities against the real kernel (runs in the guest, as root with
CAP_SYS_RESOURCE): real mariadbd, php-fpm8.2 and nginx in the app cgroup,
next to the unprivileged shop user's processes.

The policy here is the built-in one minus its two root classes
("root-automation", "oomguard"): those would give this pytest process and
the harness -1000, and with it to every later test's children (the unit
tests cover them). Everything else is the default, applied for real.

Tests run in file order on one shop; the OOM test goes last because it kills.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon_fixture import wait_for  # tests/guest is on sys.path (conftest)
from shop import Shop

from oomguard.cli import setup
from oomguard.config import parse
from oomguard.forensics import ranking
from oomguard.host import cgroups, procevents, procfs
from oomguard.policy import rules as policy
from oomguard.policy.enforcer import Enforcer
from oomguard.runs.registry import RunRegistry
from oomguard.runs.run import Run

LIMIT = 448 << 20  # the app cgroup at first: room for the shop and the user
RESERVE = 64 << 20
ROOT_CLASSES = ("root-automation", "root-sessions", "oomguard")


# ---------------------------------------------------------------- helpers


def adj(pid: int) -> int:
    return procfs.read_oom_score_adj(pid)


def cgroup_of(pid: int) -> str:
    return procfs.read_cgroup(pid)


_libc = ctypes.CDLL(None, use_errno=True)
PTRACE_TRACEME = 0


def spawn(argv, *, user: str | None = None, cgroup: str | None = None, start_adj: int | None = None,
          stop_after_exec: bool = False, **kw) -> subprocess.Popen:
    """Start argv (no shell): in ``cgroup`` from birth, at ``start_adj``, as
    ``user``. With stop_after_exec the child stops right after exec (it is
    traced by us), so a binary that would exit at once stays there to be
    looked at, with its /proc/<pid>/exe."""
    pw = pwd.getpwnam(user) if user else None

    def child() -> None:  # after fork, before exec; root until setuid
        if cgroup is not None:
            with open(cgroups.path(cgroup) / "cgroup.procs", "w") as f:
                f.write("0")
        if start_adj is not None:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write(str(start_adj))
        if pw is not None:
            os.initgroups(pw.pw_name, pw.pw_gid)
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
        if stop_after_exec and _libc.ptrace(PTRACE_TRACEME, 0, None, None) != 0:
            os._exit(127)

    proc = subprocess.Popen(list(map(str, argv)), preexec_fn=child, stdin=kw.pop("stdin", subprocess.DEVNULL),
                            env=kw.pop("env", {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}), **kw)
    if stop_after_exec:
        os.waitpid(proc.pid, os.WSTOPPED)  # the SIGTRAP after exec
    return proc


def kill(*procs: subprocess.Popen, group: bool = False) -> None:
    """SIGKILL (with group=True: the process's own session's group too)."""
    for p in procs:
        if group:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if p.poll() is None:
            p.kill()
        try:
            p.wait(timeout=30)
        except ChildProcessError:
            pass


def children_of(pid: int, cgroup: str) -> list[int]:
    out = []
    for c in cgroups.procs(cgroup):
        try:
            if procfs.read_stat(c).ppid == pid:
                out.append(c)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


@dataclass
class Stack:
    shop: Shop
    app: str  # cgroup path, "/oomguard-policy-..."
    classes: tuple
    registry: RunRegistry
    user: object  # GuestUser
    other: object
    users_procs: list[subprocess.Popen]
    workdir: Path

    def class_value(self, name: str) -> int:
        return next(c.oom_score_adj for c in self.classes if c.name == name)

    def enforcer(self) -> Enforcer:
        return Enforcer(self.classes, self.registry, app_cgroup=self.app,
                        app_uid=self.user.uid, self_pid=0)


@pytest.fixture(scope="module")
def stack(unpriv_user, other_user, tmp_path_factory):
    rel = f"oomguard-policy-{os.getpid()}"
    cfg = parse({"layout": {"app_user": unpriv_user.name, "app_cgroup": rel,
                            "system_reserve": RESERVE}})
    # the real setup path for a host without systemd: +memory, mkdir, memory.max
    setup.apply_layout(cfg, systemd=False, ram=LIMIT + RESERVE, out=io.StringIO())
    app = "/" + rel
    assert cgroups.memory_max(app) == LIMIT
    classes = tuple(c for c in policy.classes_for(cfg) if c.name not in ROOT_CLASSES)
    assert {"database", "php-fpm-master", "php-fpm-worker", "nginx-master", "nginx-worker",
            "app-user"} <= {c.name for c in classes}
    work = Path(tempfile.mkdtemp(dir="/tmp", prefix="oomguard-pol-"))  # 0700 pytest dirs won't do
    work.chmod(0o755)
    shop = Shop(work / "shop", cgroup=cgroups.path(app), max_children=4, port=8191, db_port=3319,
                fpm_port=9019)
    shop.start(timeout=300)
    registry = RunRegistry(tmp_path_factory.mktemp("state") / "runs.json")
    user_dir = work / "user"
    user_dir.mkdir()
    os.chown(user_dir, unpriv_user.uid, unpriv_user.gid)
    # the shop user's ordinary processes, in the app cgroup from birth: a
    # "session" shell, a "cron job" and a script holding some memory
    hold = "b = bytearray(24 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nimport time; time.sleep(1e6)\n"
    users_procs = [
        spawn(["bash", "-c", "sleep 1000000; :"], user=unpriv_user.name, cgroup=app),
        spawn(["sleep", "1000000"], user=unpriv_user.name, cgroup=app),
        spawn([sys.executable, "-c", hold], user=unpriv_user.name, cgroup=app),
    ]
    wait_for(lambda: procfs.read_status(users_procs[2].pid).vm_rss_kb > 20_000)
    st = Stack(shop, app, classes, registry, unpriv_user, other_user, users_procs, work)
    yield st
    kill(*users_procs)
    try:
        cgroups.set_memory_max(app, None)
        shop.stop(timeout=60)
    except Exception as e:  # noqa: BLE001 - the OOM test kills masters; the cgroup goes anyway
        print(f"shop.stop: {e}")
    finally:
        cgroups.kill(app)
        cgroups.wait_empty(app, 30)
        cgroups.remove(app)
        shutil.rmtree(work, ignore_errors=True)


def apply_policy(st: Stack) -> list[policy.Change]:
    decisions = policy.plan(procfs.iter_processes(), st.classes, st.registry)
    changes = policy.apply(decisions, registry=st.registry)
    assert [c for c in changes if not c.ok] == []
    return changes


# ---------------------------------------------------------------- tests


def test_apply_gives_each_class_its_value(stack):
    st = stack
    pids = st.shop.pids()
    changes = apply_policy(st)
    assert changes, "the shop started at 0 everywhere; something had to change"
    (db,) = pids["mariadbd"]
    assert adj(db) == -1000 == st.class_value("database")
    assert adj(pids["php-fpm"][0]) == st.class_value("php-fpm-master") < 0
    assert adj(pids["nginx"][0]) == st.class_value("nginx-master") < 0
    assert len(pids["php-fpm-workers"]) == 4 and len(pids["nginx-workers"]) == 1
    assert {adj(p) for p in pids["php-fpm-workers"]} == {st.class_value("php-fpm-worker")}
    assert {adj(p) for p in pids["nginx-workers"]} == {st.class_value("nginx-worker")}
    user_pids = [p for p in cgroups.procs(st.app) if procfs.read_status(p).uids[0] == st.user.uid]
    assert len(user_pids) >= 4  # bash, its sleep, sleep, python
    assert {adj(p) for p in user_pids} == {1000}
    # a second apply finds everything right
    assert apply_policy(st) == []


def test_a_user_cannot_lower_what_the_policy_gave(stack):
    st = stack
    d = Path(tempfile.mkdtemp(dir=st.workdir))
    d.chmod(0o777)
    go, out = d / "go", d / "out"
    script = textwrap.dedent(f"""\
        while [ ! -e {go} ]; do sleep 0.05; done
        echo 999 > /proc/self/oom_score_adj; echo "self=$?" > {out}
        sh -c 'echo 0 > /proc/self/oom_score_adj; echo "child=$?"' >> {out}
        echo "now=$(cat /proc/self/oom_score_adj)" >> {out}
        exec sleep 1000000
    """)
    # control: without a policy write, a user may lower their own value
    # (down to the minimum they inherited, 0 here)
    other = st.other.run(["sh", "-c", "echo 500 > /proc/self/oom_score_adj && "
                          "echo 100 > /proc/self/oom_score_adj && cat /proc/self/oom_score_adj"])
    assert other.stdout.strip() == "100", other
    proc = spawn(["sh", "-c", script], user=st.user.name, cgroup=st.app, start_adj=0,
                 stderr=subprocess.DEVNULL)
    try:
        apply_policy(st)
        assert adj(proc.pid) == 1000
        go.touch()
        text = wait_for(lambda: out.exists() and "now=" in out.read_text() and out.read_text())
        assert "self=1" in text and "child=1" in text, text  # EACCES both times
        assert "now=1000" in text
        assert adj(proc.pid) == 1000
    finally:
        kill(proc)


def test_renamed_and_copied_database_binaries_get_nothing(stack):
    st = stack
    d = Path(tempfile.mkdtemp(dir=st.workdir))
    d.chmod(0o755)
    renamed, copied = d / "mysqld", d / "mariadbd"
    shutil.copy2("/usr/sbin/mariadbd", renamed)
    shutil.copy2("/usr/sbin/mariadbd", copied)
    cases = [
        # (who, binary, expected class)
        (st.user.name, renamed, "app-user"),  # the app user: +1000, nothing lower
        (st.other.name, renamed, None),
        (st.other.name, "/usr/sbin/mariadbd", None),  # the real binary, the wrong user
        ("mysql", copied, None),  # the right user, a copied binary
    ]
    procs = [spawn([binary, "--version"], user=who, start_adj=0, stop_after_exec=True)
             for who, binary, _ in cases]
    try:
        for p in procs:
            assert procfs.read_exe(p.pid) in (str(renamed), str(copied), "/usr/sbin/mariadbd")
        snaps = [procfs.snapshot(p.pid) for p in procs]
        assert snaps[0].comm == "mysqld" and snaps[2].comm == "mariadbd"
        decisions = policy.plan(snaps, st.classes, st.registry)
        assert [x.class_name for x in decisions] == [c for _, _, c in cases]
        assert not [c for c in policy.apply(decisions) if not c.ok]
        assert [adj(p.pid) for p in procs] == [1000, 0, 0, 0]
        # and the real database still is the database
        (db,) = st.shop.pids()["mariadbd"]
        assert policy.plan([procfs.snapshot(db)], st.classes, None)[0].class_name == "database"
    finally:
        kill(*procs)


@pytest.mark.parametrize("mode", ["events", "polling"])
def test_processes_started_later_get_their_class(stack, mode):
    st = stack
    apply_policy(st)
    enf = st.enforcer()
    enf.resync()  # what the daemon does at start: learn every live process's class
    stop = threading.Event()
    if mode == "events":
        pe = procevents.ProcEvents()
        pe.open()
        thread = threading.Thread(target=pe.run, args=(enf.handle, stop), daemon=True)
    else:
        thread = threading.Thread(target=enf.run_polling, args=(stop, 0.5), daemon=True)
    thread.start()
    started: list[subprocess.Popen] = []
    protected: list[subprocess.Popen] = []
    try:
        if mode == "polling":
            wait_for(lambda: enf.stats.polls >= 1)
        before = st.shop.pids()
        # a php-fpm worker dies; the master (-900) forks a new one, which
        # inherits -900 until the policy gives it its class value
        victim = before["php-fpm-workers"][0]
        os.kill(victim, signal.SIGKILL)
        new = wait_for(lambda: set(st.shop.pids()["php-fpm-workers"]) - set(before["php-fpm-workers"]))
        (worker,) = new
        wait_for(lambda: adj(worker) == st.class_value("php-fpm-worker"), timeout=60)
        # an nginx worker too (its master is at -800)
        os.kill(before["nginx-workers"][0], signal.SIGKILL)
        nw = wait_for(lambda: set(st.shop.pids()["nginx-workers"]) - set(before["nginx-workers"]))
        (nworker,) = nw
        wait_for(lambda: adj(nworker) == st.class_value("nginx-worker"), timeout=60)
        # the app user's new process, started outside the app cgroup, is
        # placed into it and gets +1000
        p = spawn(["sleep", "1000000"], user=st.user.name, start_adj=0)
        started.append(p)
        wait_for(lambda: cgroup_of(p.pid) == st.app and adj(p.pid) == 1000, timeout=60)
        # a protected run of the app user is left alone, and so are its children
        gate_r, gate_w = os.pipe()
        q = spawn(["sh", "-c", "read x; sleep 1000000 & wait"], user=st.user.name, cgroup=st.app,
                  stdin=gate_r, start_new_session=True)
        os.close(gate_r)
        protected.append(q)
        qs = procfs.starttime_of(q.pid)
        st.registry.add(Run(id=st.registry.new_id(), uid=st.user.uid, user=st.user.name, pid=q.pid,
                            starttime=qs, started=time.time(), command="sh", cgroup=None))
        procfs.write_oom_score_adj(-1000, q.pid)  # what the broker does
        os.write(gate_w, b"go\n")
        os.close(gate_w)
        child = wait_for(lambda: children_of(q.pid, st.app))[0]
        time.sleep(2 if mode == "events" else 1.5)  # events in flight / a few polls
        assert adj(q.pid) == -1000 and adj(child) == -1000
        assert st.registry.is_protected(child, procfs.starttime_of(child), cgroup_of(child))
        assert enf.stats.errors == 0
    finally:
        stop.set()
        thread.join(timeout=10)
        kill(*started)
        kill(*protected, group=True)
        for run in st.registry.active():
            st.registry.update(run.id, ended=time.time(), end_reason="test over")


FILLER = """
import os, sys, time
path, stop = sys.argv[1], sys.argv[2]
chunk = b"x" * (1 << 20)
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
n = 0
try:
    while n < 400 and not os.path.exists(stop):
        os.write(fd, chunk)   # tmpfs: charged to this cgroup, not freed by any kill
        n += 1
        print(n, flush=True)
        time.sleep(0.03)
except OSError as e:
    print("error", e.errno, flush=True)
"""

KILLED = re.compile(r"Killed process (\d+) \((.*?)\).*oom_score_adj:(-?\d+)")


def test_an_app_cgroup_oom_takes_victims_in_policy_order(stack, kmsg, guest_results_dir):
    """Fill the app cgroup with tmpfs pages (no kill frees them) from a
    protected process, and watch the OOM killer's victims."""
    st = stack
    apply_policy(st)
    enf = st.enforcer()  # respawned workers must get their class value at once
    enf.resync()
    stop = threading.Event()
    pe = procevents.ProcEvents()
    pe.open()
    thread = threading.Thread(target=pe.run, args=(enf.handle, stop), daemon=True)
    thread.start()
    pids = st.shop.pids()
    (db,) = pids["mariadbd"]
    initial = set(cgroups.procs_recursive(st.app))
    users = {p for p in cgroups.procs_recursive(st.app)
             if procfs.read_status(p).uids[0] == st.user.uid and adj(p) == 1000}
    assert len(users) >= 4
    # what `oomguard top --cgroup` says the kernel will take first
    predicted = ranking.rank(st.app).victims[0]
    assert predicted.adj == 1000 and predicted.pid in users
    tmpfs = st.workdir / "tmpfs"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900m", "tmpfs", str(tmpfs)], check=True)
    stopfile = st.workdir / "stop-filler"
    victims: list[tuple[int, str, int]] = []
    filler = None
    try:
        current = cgroups.memory_current(st.app)
        cgroups.set_memory_max(st.app, current + (40 << 20))
        filler = spawn([sys.executable, "-c", FILLER, tmpfs / "fill", stopfile], cgroup=st.app,
                       start_adj=-1000, stdout=subprocess.PIPE, text=True)
        st.registry.add(Run(id=st.registry.new_id(), uid=0, user="root", pid=filler.pid,
                            starttime=procfs.starttime_of(filler.pid), started=time.time(),
                            command="filler", cgroup=None))
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and filler.poll() is None:
            for line in kmsg.read():
                if m := KILLED.search(line):
                    victims.append((int(m[1]), m[2], int(m[3])))
            if len(victims) >= len(users) + 6:
                break
            time.sleep(0.1)
        stopfile.touch()
        filler.wait(timeout=60)
        for line in kmsg.read():
            if m := KILLED.search(line):
                victims.append((int(m[1]), m[2], int(m[3])))
    finally:
        stop.set()
        thread.join(timeout=10)
        if filler is not None:
            kill(filler)
        subprocess.run(["umount", str(tmpfs)], check=False)
        cgroups.set_memory_max(st.app, LIMIT)
    print("\nvictims (pid, comm, oom_score_adj):", victims)
    (guest_results_dir / "policy-oom-victims.json").write_text(json.dumps(
        {"users": sorted(users), "predicted": predicted.pid, "database": db, "victims": victims}) + "\n")
    assert len(victims) >= len(users) + 1, victims
    # Among the processes there at the start, the kill order follows the
    # classes. php-fpm respawns workers during the OOM; a respawn that comes
    # after an nginx worker died may rightly die after it, so it is left out.
    values = [v[2] for v in victims if v[0] in initial]
    assert values == sorted(values, reverse=True), ("a lower class died before a higher one", victims)
    # the app user's processes go first, all of them, the one top named first
    assert {v[0] for v in victims[: len(users)]} == users
    assert victims[0][0] == predicted.pid
    # then the killable workers, never the masters while workers are left
    after = victims[len(users):]
    assert after and after[0][1] == "php-fpm8.2" and after[0][2] == st.class_value("php-fpm-worker")
    # the database survives it all
    assert db not in {v[0] for v in victims}
    assert procfs.starttime_of(db) is not None and adj(db) == -1000
    assert cgroups.memory_events(st.app)["oom_kill"] >= len(victims)
