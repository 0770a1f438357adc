"""`oomguard status` from what the daemon knows: the enforcer's book of the
oom_score_adj it last saw or wrote, checked against /proc at the moment of
asking, and the walk of /proc where the enforcer is not on events.

-1000 cannot be set on this host (no CAP_SYS_RESOURCE), so the status op
is tested on a fake /proc where it can be staged, through the daemon's real
enforcer and op; the book and the checks are also tested on real
processes, at a value anyone may raise to."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
from broker_rig import NOBODY, Rig

from oomguard.broker.peer import Peer
from oomguard.config import parse_policy_class
from oomguard.daemon import Daemon
from oomguard.forensics import status
from oomguard.host import procfs
from oomguard.policy.adjbook import AdjBook
from oomguard.policy.enforcer import Enforcer
from oomguard.runs.run import Run

OTHER = 1000


# ---------------------------------------------------------------- the book


def test_the_book_keeps_the_protected_apart_and_forgets_at_exit() -> None:
    book = AdjBook()
    book.note((10, 100), -1000)
    book.note((11, 100), 0)
    book.note((12, 100), -1000)
    assert sorted(book.protected()) == [(10, 100), (12, 100)]
    book.note((12, 100), 0)  # a write of ours raised it
    book.forget(10)
    assert book.protected() == [] and book.get((11, 100)) == 0 and book.get((10, 100)) is None


def test_a_reused_pid_replaces_its_old_process_and_an_older_look_does_not() -> None:
    book = AdjBook()
    book.note((10, 100), -1000)
    book.note((10, 200), 0)  # another process has the pid now
    assert book.protected() == [] and book.get((10, 100)) is None and book.get((10, 200)) == 0
    book.note((10, 100), -1000)  # a walk's look at the old one, made before
    assert book.protected() == [] and book.get((10, 200)) == 0


def test_a_walk_keeps_only_what_events_touched_meanwhile() -> None:
    book = AdjBook()
    book.note((10, 100), -1000)
    book.note((11, 100), -1000)
    assert not book.complete
    book.keep_only({11})
    assert book.protected() == [(11, 100)] and len(book) == 1 and book.complete


# ---------------------------------------------------------------- real processes


@pytest.fixture
def sleeper(tmp_path):
    path = tmp_path / f"oomgstat-{os.getpid() % 10000}"
    shutil.copy2(shutil.which("sleep"), path)
    procs: list[subprocess.Popen] = []

    def spawn() -> subprocess.Popen:
        child = subprocess.Popen([str(path), "60"])
        procs.append(child)
        deadline = time.monotonic() + 5
        # exec'd and asleep: past its start-up, its memory settled
        while (st := procfs.read_stat(child.pid)).comm != path.name or st.state != "S":
            assert time.monotonic() < deadline
            time.sleep(0.005)
        return child

    yield spawn
    for p in procs:
        p.kill()
        p.wait()


def _enforcer(adj: int) -> Enforcer:
    cls = parse_policy_class({"name": "oomgstat", "oom_score_adj": adj, "comm": ["oomgstat-*"]}, "t")
    return Enforcer((cls,), None, self_pid=0)


def test_the_enforcer_books_what_it_wrote_and_status_checks_it_now(sleeper) -> None:
    enf = _enforcer(555)
    a, b = sleeper(), sleeper()
    for p in (a, b):
        assert enf.check(p.pid).current == 0  # looked at before its write
    key_a = (a.pid, procfs.starttime_of(a.pid))
    key_b = (b.pid, procfs.starttime_of(b.pid))
    assert enf.adj.get(key_a) == 555 == enf.adj.get(key_b)  # what it wrote, not what it saw
    assert [p["pid"] for p in status.protected_among([key_a, key_b], adj=555)] == sorted([a.pid, b.pid])
    procfs.write_oom_score_adj(0, a.pid)  # someone else, without an event
    reused = (b.pid, key_b[1] - 1)  # the book's process had the pid before b
    listed = status.protected_among([key_a, reused], adj=555)
    assert listed == []  # a left the value since; the pid is not that process any more
    rss_before = procfs.read_status(b.pid).vm_rss_kb
    shown = status.protected_among([(b.pid, None)], adj=555)[0]  # a run's cgroup lists pids only
    rss_after = procfs.read_status(b.pid).vm_rss_kb  # a live process's RSS may move: bracket it
    assert min(rss_before, rss_after) <= shown.pop("rss_kb") <= max(rss_before, rss_after)
    assert shown == {"pid": b.pid, "uid": os.getuid(), "comm": procfs.read_stat(b.pid).comm,
                     "cgroup": procfs.read_cgroup(b.pid)}
    enf.handle(("exit", b.pid, 0))
    assert enf.adj.get(key_b) is None and enf.adj.get(key_a) == 555


def test_an_exec_look_books_the_value_the_process_has(sleeper) -> None:
    enf = _enforcer(555)
    a = sleeper()
    enf.resync()
    key = (a.pid, procfs.starttime_of(a.pid))
    assert enf.adj.complete and enf.adj.get(key) == 555
    procfs.write_oom_score_adj(600, a.pid)  # no event: the book cannot know
    assert enf.adj.get(key) == 555
    enf.handle(("exec", a.pid))  # its exec look sees 600 and writes 555 back
    assert enf.adj.get(key) == 555 == procfs.read_oom_score_adj(a.pid)


# ---------------------------------------------------------------- status, at -1000


class FakeProc:
    """A /proc tree of processes with what snapshot and glance read."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir()
        (root / "meminfo").write_text("MemTotal: 4194304 kB\nMemAvailable: 2097152 kB\n")
        (root / "sys/kernel/random").mkdir(parents=True)
        (root / "sys/kernel/random/boot_id").write_text(procfs.boot_id() + "\n")

    def add(self, pid: int, adj: int, *, uid: int = 0, start: int | None = None, comm: str = "oomgfake",
            flags: int = 0x400000) -> tuple:
        d = self.root / str(pid)
        d.mkdir(exist_ok=True)
        st = pid * 10 if start is None else start
        rest = " ".join(["0"] * 25)
        (d / "stat").write_text(f"{pid} ({comm}) S 1 {pid} {pid} 0 -1 {flags} 0 0 0 0 0 0 0 0 20 0 1 0 {st} 1000 "
                                f"250 {rest}\n")  # fmt: skip
        (d / "status").write_text(f"Name:\t{comm}\nPPid:\t1\nTgid:\t{pid}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
                                  f"Gid:\t{uid}\t{uid}\t{uid}\t{uid}\nVmRSS:\t1000 kB\n")  # fmt: skip
        (d / "oom_score_adj").write_text(f"{adj}\n")
        (d / "oom_score").write_text("0\n")
        (d / "cgroup").write_text(f"0::/fake/{pid}\n")
        if not (d / "exe").is_symlink():
            (d / "exe").symlink_to("/usr/bin/oomgfake")
        return (pid, st)

    def set_adj(self, pid: int, adj: int) -> None:
        (self.root / str(pid) / "oom_score_adj").write_text(f"{adj}\n")

    def remove(self, pid: int) -> None:
        shutil.rmtree(self.root / str(pid))


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeProc:
    fp = FakeProc(tmp_path / "proc")
    monkeypatch.setattr(procfs, "PROC", str(fp.root))
    return fp


def _daemon(rig: Rig, *, enforce: bool = True, mode: str = "events") -> Daemon:
    """A daemon whose status op answers (nothing of it runs); its enforcer on
    events when ``mode`` says so, as after the daemon's start."""
    cfg = rig.protect_config()
    cfg = replace(cfg, state_dir=str(rig.base / "state"),
                  events=replace(cfg.events, db=str(rig.base / "state" / "events.db")),
                  policy=replace(cfg.policy, enforce=enforce))  # fmt: skip
    d = Daemon(cfg)
    d.events_mode = mode
    d.ops.status_view.ttl = 0  # every ask computes afresh here
    return d


@pytest.fixture
def daemon(rig: Rig):
    made: list[Daemon] = []

    def make(**kw) -> Daemon:
        made.append(_daemon(rig, **kw))
        return made[-1]

    yield make
    for d in made:
        d.event_reader.close()
        d.store.close()


def _peer(uid: int) -> Peer:
    return Peer(pid=os.getpid(), uid=uid, gid=uid, groups=(), accepted=0.0)


def protected(d: Daemon, uid: int = 0) -> list[int]:
    return [p["pid"] for p in d.ops.op_status(_peer(uid), {})["protected"]]


def test_status_lists_the_known_minus_1000_processes_that_still_are(fake, daemon) -> None:
    for pid in (4101, 4102, 4103):
        fake.add(pid, -1000)
    fake.add(4104, 0)
    d = daemon()
    d.enforcer.resync()  # the daemon's first walk
    assert protected(d) == [4101, 4102, 4103]
    fake.set_adj(4101, 0)  # left -1000 since, without an event
    fake.add(4102, -1000, start=99_999)  # 4102 exited unseen and its pid is another process's now
    fake.set_adj(4104, -1000)  # raised by someone else: unseen until an event or a resync
    assert protected(d) == [4103]
    d.enforcer.handle(("exec", 4104))  # e.g. systemd's OOMScoreAdjust= before exec: its exec look
    assert protected(d) == [4103, 4104]
    d.enforcer.resync()
    assert protected(d) == [4102, 4103, 4104]  # the walk looked at the new 4102


def test_status_lists_a_runs_process_the_table_does_not_know(fake, daemon) -> None:
    d = daemon()
    d.enforcer.resync()
    pid, start = fake.add(4201, -1000, uid=OTHER)  # granted a moment ago: no look yet
    d.registry.add(Run(id=1, uid=OTHER, user="shop", pid=pid, starttime=start, started=time.time(),
                       command="import.php", cgroup=None))  # fmt: skip
    assert protected(d) == [4201]
    fake.set_adj(4201, 0)
    assert protected(d) == []  # in a run, but not at -1000 now


def test_status_walks_proc_when_the_enforcer_is_not_on_events(fake, daemon) -> None:
    for d in (daemon(enforce=False), daemon(mode="polling"), daemon(mode="starting")):
        d.enforcer.resync()
        fake.add(4301, -1000)  # unknown to any enforcer
        assert protected(d) == [4301], d.events_mode
        fake.remove(4301)
    before_walk = daemon()  # on events, but its first walk has not finished: the book misses the older ones
    fake.add(4302, -1000)
    fake.add(4303, -1000, flags=procfs.PF_KTHREAD, comm="kworker/0:1")  # no one's process: left out, as before
    assert protected(before_walk) == [4302]


def test_a_user_sees_only_their_own_protected_processes(fake, daemon) -> None:
    fake.add(4401, -1000, uid=NOBODY)
    fake.add(4402, -1000, uid=OTHER)
    d = daemon()
    d.enforcer.resync()
    assert protected(d, NOBODY) == [4401]
    assert protected(d, OTHER) == [4402]
    assert protected(d, 0) == [4401, 4402]
    walking = daemon(enforce=False)
    assert protected(walking, NOBODY) == [4401]
