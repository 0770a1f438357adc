"""Ranking: the kernel's arithmetic, checked against the running kernel for
our own children, and the cgroup ranking on fake /proc and cgroup trees
(where -1000, kernel threads, limits and swap can be staged freely)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from oomguard.cli.render import format_ranking
from oomguard.forensics import ranking
from oomguard.host import cgroups, oomstat, procfs

KB = 1024


class FakeProc:
    def __init__(self, root: Path, mem_kb: int = 4 << 20, swap_kb: int = 0, swappiness: int = 60):
        self.root = root
        (root / "sys/vm").mkdir(parents=True)
        (root / "sys/vm/swappiness").write_text(f"{swappiness}\n")
        (root / "meminfo").write_text(f"MemTotal: {mem_kb} kB\nSwapTotal: {swap_kb} kB\n")

    def add(self, pid, comm="x", *, rss_kb=1000, swap_kb=0, pte_kb=8, adj=0, score=None, euid=0,
            start=None, kthread=False, owner=0, ppid=1):
        d = self.root / str(pid)
        d.mkdir()
        flags = ranking.PF_KTHREAD if kthread else 0x400000
        rss_pages = 0 if kthread else rss_kb * KB // procfs.PAGE_SIZE
        st = pid * 10 if start is None else start
        rest = " ".join(["0"] * 25)
        (d / "stat").write_text(
            f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 {flags} 0 0 0 0 0 0 0 0 20 0 1 0 {st} 1000 {rss_pages} {rest}\n")
        (d / "oom_score").write_text(f"{0 if score is None else score}\n")
        (d / "oom_score_adj").write_text(f"{adj}\n")
        vm = "" if kthread else (f"VmPeak:\t{rss_kb} kB\nVmRSS:\t{rss_kb} kB\nVmPTE:\t{pte_kb} kB\n"
                                 f"VmSwap:\t{swap_kb} kB\nVmPin:\t0 kB\n")
        (d / "status").write_text(
            f"Name:\t{comm}\nState:\tS (sleeping)\nTgid:\t{pid}\nPid:\t{pid}\nPPid:\t{ppid}\n"
            f"Uid:\t{euid}\t{euid}\t{euid}\t{euid}\nGid:\t0\t0\t0\t0\n{vm}Threads:\t1\n")
        os.chown(d, owner, owner)


class FakeCgroups:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir()
        (root / "cgroup.controllers").write_text("memory\n")
        (root / "cgroup.procs").write_text("")

    def add(self, path: str, pids=(), max_: str | None = None, swap_max: str | None = None):
        d = self.root / path.strip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
        if max_ is not None:
            (d / "memory.max").write_text(max_ + "\n")
        if swap_max is not None:
            (d / "memory.swap.max").write_text(swap_max + "\n")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    fp = FakeProc(tmp_path / "proc")
    fc = FakeCgroups(tmp_path / "cg")
    monkeypatch.setattr(procfs, "PROC", str(fp.root))
    monkeypatch.setattr(cgroups, "ROOT", fc.root)
    return fp, fc


PAGES_PER_MB = (1 << 20) // procfs.PAGE_SIZE


# ---------------------------------------------------------------- the arithmetic


def test_badness_is_the_kernels():
    assert ranking.badness(100, 20, 3, 0, 10_000) == 123
    assert ranking.badness(100, 0, 0, 500, 10_000) == 100 + 500 * 10
    assert ranking.badness(100, 0, 0, -50, 10_000) == 100 - 500
    # the kernel divides first: under 1000 pages the adjustment vanishes
    assert ranking.badness(100, 0, 0, 1000, 999) == 100
    assert ranking.badness(100, 0, 0, -1000, 10_000) is None


def test_oom_score_scaling():
    total = 1_000_000
    assert ranking.oom_score(None, total) == 0
    assert ranking.oom_score(0, total) == 666
    assert ranking.oom_score(total, total) == 1333
    assert ranking.oom_score(-total, total) == 0
    assert ranking.oom_score(-1, total) == 666  # C truncates toward zero


def _spawn(tmp_path, adj: int) -> subprocess.Popen:
    path = tmp_path / "oomgtest-rank"
    if not path.exists():
        shutil.copy2(shutil.which("sleep"), path)
    child = subprocess.Popen([str(path), "60"])
    deadline = time.monotonic() + 5
    while procfs.read_stat(child.pid).comm != path.name:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    procfs.write_oom_score_adj(adj, child.pid)
    return child


def _kernel_view(pid: int) -> tuple[int, int]:
    """(our prediction of oom_score, the kernel's), read back to back."""
    base = f"/proc/{pid}/"
    for _ in range(20):  # retry if the process changed between the reads
        status = Path(base + "status").read_bytes()
        kernel = int(Path(base + "oom_score").read_text())
        if Path(base + "status").read_bytes() == status:
            break
    _name, _euid, rss, swap, pte, _ppid = oomstat.parse_oom_status(status)
    adj = int(Path(base + "oom_score_adj").read_text())
    total = ranking.total_pages()
    kb = procfs.PAGE_SIZE // 1024
    points = ranking.badness(rss // kb, (swap or 0) // kb, (pte or 0) * 1024 // procfs.PAGE_SIZE, adj, total)
    return ranking.oom_score(points, total), kernel


def test_formula_matches_the_running_kernel(tmp_path):
    children = [_spawn(tmp_path, adj) for adj in (0, 300, 1000)]
    try:
        for c in children:
            ours, kernel = _kernel_view(c.pid)
            assert ours == kernel, (c.pid, ours, kernel)
        me_ours, me_kernel = _kernel_view(os.getpid())
        assert abs(me_ours - me_kernel) <= 1  # we are running: rss may move
    finally:
        for c in children:
            c.kill()
            c.wait()


def test_global_ranking_on_the_host_orders_by_oom_score(tmp_path):
    children = [_spawn(tmp_path, adj) for adj in (0, 1000, 500)]
    try:
        r = ranking.rank()
        ours = [e for e in r.entries if e.pid in {c.pid for c in children}]
        assert [e.adj for e in ours] == [1000, 500, 0]
        assert all(e.user == "root" and e.comm == "oomgtest-rank" for e in ours)
        scores = [e.oom_score for e in r.victims]
        assert scores == sorted(scores, reverse=True)
        assert [e.rank for e in r.victims] == list(range(1, len(r.victims) + 1))
        assert not any(e.pid == 1 and e.killable for e in r.entries)
        assert all(e.pid != 2 for e in r.entries)  # kthreadd: no kernel threads
        assert any(e.pid == 2 for e in ranking.rank(include_kernel_threads=True).entries)
    finally:
        for c in children:
            c.kill()
            c.wait()


# ---------------------------------------------------------------- global, staged


def test_global_ranking_staged(fake):
    fp, _ = fake
    fp.add(1, "init", rss_kb=9000, score=700)
    fp.add(2, "kthreadd", kthread=True)
    fp.add(10, "big", rss_kb=500_000, score=800)
    fp.add(11, "app", rss_kb=1000, adj=1000, score=1333, euid=65534, owner=65534)
    fp.add(12, "tie-old", rss_kb=2000, score=700, start=100)
    fp.add(13, "tie-new", rss_kb=2000, score=700, start=200)
    fp.add(14, "tie-big", rss_kb=3000, score=700, start=50)
    fp.add(15, "mysqld", rss_kb=900_000, adj=-1000, score=0, euid=102)
    # a worker after setuid: /proc shows it as root, status knows better
    fp.add(16, "php-fpm", rss_kb=1000, score=666, euid=33, owner=0)
    r = ranking.rank()
    order = [e.comm for e in r.entries]
    assert order[:5] == ["app", "big", "tie-big", "tie-new", "tie-old"]
    assert [e.rank for e in r.entries[:5]] == [1, 2, 3, 4, 5]
    never = {e.comm: e for e in r.entries if not e.killable}
    assert set(never) == {"init", "mysqld"} and never["mysqld"].rank is None
    assert order[-2:] == ["mysqld", "init"]
    by = {e.comm: e for e in r.entries}
    assert "kthreadd" not in by
    assert (by["app"].uid, by["php-fpm"].uid, by["mysqld"].uid) == (65534, 33, 102)
    assert by["php-fpm"].user == "www-data"
    assert by["big"].rss_kb == 500_000
    assert r.totalpages == (4 << 20) * KB // procfs.PAGE_SIZE


def test_vanished_and_garbage_entries_are_skipped(fake):
    fp, _ = fake
    fp.add(10, "ok", score=700)
    (fp.root / "11").mkdir()  # exited between listdir and open
    fp.add(12, "bad", score=700)
    (fp.root / "12" / "oom_score").write_text("")
    assert [e.pid for e in ranking.rank().entries] == [10]


# ---------------------------------------------------------------- cgroup


def test_cgroup_ranking_scales_by_the_limit(fake):
    fp, fc = fake
    limit = 100 << 20  # 100M
    fc.add("/app", [20, 21], max_=str(limit))
    fc.add("/app/run-1", [22])
    fc.add("/other", [30])
    fp.add(20, "php-fpm-w", rss_kb=60_000, adj=0)
    fp.add(21, "script", rss_kb=10_000, adj=500)  # 10M + half of 100M
    fp.add(22, "import", rss_kb=80_000, adj=-1000)
    fp.add(30, "outside", rss_kb=3_000_000, adj=1000)
    r = ranking.rank("/app")
    assert [e.comm for e in r.entries] == ["script", "php-fpm-w", "import"]
    total = limit // procfs.PAGE_SIZE
    assert r.totalpages == total and r.cgroup == "/app"
    by = {e.comm: e for e in r.entries}
    assert by["script"].points == 10_000 * KB // procfs.PAGE_SIZE + 8 * KB // procfs.PAGE_SIZE + 500 * (total // 1000)
    assert by["import"].points is None and not by["import"].killable and by["import"].rank is None
    # the same processes in a global OOM: the adjustment is tiny against 4G
    glob_total = ranking.total_pages()
    assert 500 * (glob_total // 1000) > 500 * (total // 1000)


def test_cgroup_ranking_counts_swap_and_page_tables(fake):
    fp, fc = fake
    fc.add("/app", [20, 21], max_=str(1 << 30))
    fp.add(20, "resident", rss_kb=50_000, swap_kb=0, pte_kb=4)
    fp.add(21, "swapped", rss_kb=10_000, swap_kb=30_000, pte_kb=12_000)
    r = ranking.rank("/app")
    assert [e.comm for e in r.entries] == ["swapped", "resident"]
    assert r.entries[0].swap_kb == 30_000 and r.entries[0].pte_kb == 12_000


def test_cgroup_ties_go_to_the_last_scanned(fake):
    fp, fc = fake
    fc.add("/app", [40, 20], max_=str(1 << 30))
    fc.add("/app/sub", [10])
    for pid in (10, 20, 40):
        fp.add(pid, f"w{pid}", rss_kb=4000)
    # scan order: /app's procs as listed (40, 20), then /app/sub (10)
    assert [e.pid for e in ranking.rank("/app").entries] == [10, 20, 40]


def test_cgroup_limit_swap_and_fallbacks(tmp_path, monkeypatch):
    fp = FakeProc(tmp_path / "proc", mem_kb=8 << 20, swap_kb=2 << 20)
    fc = FakeCgroups(tmp_path / "cg")
    monkeypatch.setattr(procfs, "PROC", str(fp.root))
    monkeypatch.setattr(cgroups, "ROOT", fc.root)
    ps = procfs.PAGE_SIZE
    fc.add("/a", [], max_=str(1 << 30), swap_max="max")
    fc.add("/a/b", [], max_="max")
    fc.add("/c", [], max_=str(1 << 30), swap_max=str(256 << 20))
    fc.add("/d", [], max_="max")
    fc.add("/d/e", [], max_=str(512 << 20), swap_max="0")
    fc.add("/d/e/f", [], max_=str(1 << 30), swap_max="0")
    swap = (2 << 30) // ps
    assert ranking.cgroup_total_pages("/a") == (1 << 30) // ps + swap
    assert ranking.cgroup_total_pages("/a/b") == (1 << 30) // ps + swap  # the limited ancestor's
    assert ranking.cgroup_total_pages("/c") == (1 << 30) // ps + (256 << 20) // ps
    assert ranking.cgroup_total_pages("/d") == ((8 << 30) + (2 << 30)) // ps
    # mem_cgroup_get_max() reads the OOMing cgroup's own limit
    assert ranking.cgroup_total_pages("/d/e/f") == (1 << 30) // ps
    (fp.root / "sys/vm/swappiness").write_text("0\n")
    assert ranking.cgroup_total_pages("/c") == (1 << 30) // ps


def test_cgroup_ranking_skips_the_mmless_and_the_gone(fake):
    fp, fc = fake
    fc.add("/app", [20, 21, 22, 1], max_=str(1 << 30))
    fp.add(20, "zombie", kthread=True)  # no Vm* lines: no mm
    fp.add(22, "live", rss_kb=100)
    fp.add(1, "init", rss_kb=100_000)
    r = ranking.rank("app")  # a path without the slash is the same cgroup
    assert [(e.comm, e.killable) for e in r.entries] == [("live", True), ("init", False)]
    with pytest.raises(FileNotFoundError):
        ranking.rank("/nope")


def test_format_table_lists_next_victim_first(fake):
    fp, fc = fake
    fc.add("/app", [20, 21], max_=str(1 << 30))
    fp.add(20, "small", rss_kb=100)
    fp.add(21, "db", rss_kb=100, adj=-1000, euid=102)
    lines = format_ranking(ranking.rank("/app")).splitlines()
    assert lines[0].split()[:3] == ["#", "PID", "POINTS"]
    assert lines[1].split()[0:2] == ["1", "20"] and lines[2].split()[0:2] == ["never", "21"]
    assert "mysql" in lines[2]
