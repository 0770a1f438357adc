"""The data behind ``oomguard top``: processes in the order the OOM killer
would take them.

Global ranking (no cgroup): by /proc/<pid>/oom_score, the kernel's own
number. oom_score is badness scaled to 0..2000 and so coarse (one step is
1.5 per mille of RAM+swap); ties are broken by what stat gives for free,
resident pages plus the adjustment in pages, and then by start time, since
the kernel's scan keeps the *last* task with the highest points and scans
processes in creation order.

Cgroup ranking (``--cgroup PATH``), as mm/oom_kill.c does for an OOM inside
that memory cgroup (Linux 6.1):

    points = rss + swapents + pgtables_bytes / PAGE_SIZE          (pages)
    points += oom_score_adj * (totalpages / 1000)                 (integer division first)
    totalpages = memory.max (+ min(memory.swap.max, total swap) if swappiness)

only tasks in the cgroup's subtree are candidates, init and kernel threads
never are, and neither is any task with oom_score_adj -1000. The kernel
scans the subtree parent first, each cgroup's tasks in cgroup.procs order,
and keeps the last of equal scores; ties here follow that order.

What cannot be seen from user space is left out: MMF_OOM_SKIP (a victim
being reaped), tasks in vfork, and oom_task_origin (swapoff).

Speed: one directory listing, then per process only the files needed. The
global ranking reads stat, oom_score and oom_score_adj, plus status only for
processes whose /proc directory is owned by root, because the kernel shows a
non-dumpable process (a php-fpm or nginx worker after setuid) as root there.
The cgroup ranking reads status and oom_score_adj of the subtree's
processes only. The readers are the host layer's (oomstat.read_oom_sample,
oomstat.read_oom_status, cgroups.swap_max); this module only does the
kernel's arithmetic and the ordering.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from oomguard.host import cgroups, oomstat, procfs
from oomguard.host.oomstat import PF_KTHREAD as PF_KTHREAD  # re-exported for tests
from oomguard.host.users import UserNames

OOM_SCORE_ADJ_MIN = -1000
# Garbage in a /proc file of a process that is going away, or unreadable.
_SKIP = (procfs.NoSuchProcess, PermissionError, ValueError, IndexError)


@dataclass(frozen=True, slots=True)
class Entry:
    pid: int
    uid: int
    user: str
    comm: str
    adj: int
    rss_kb: int
    oom_score: int | None  # /proc/<pid>/oom_score (global ranking)
    points: int | None  # kernel badness in pages (cgroup ranking; estimate in the global one)
    killable: bool  # False: the OOM killer never picks it (-1000, init)
    rank: int | None = None  # 1 is the next victim; None if never picked
    starttime: int = 0  # global ranking: clock ticks after boot
    swap_kb: int | None = None
    pte_kb: int | None = None
    scan: int = 0  # cgroup ranking: position in the kernel's scan order

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Ranking:
    entries: list[Entry]
    cgroup: str | None  # None: a global OOM
    totalpages: int  # what oom_score_adj is scaled by (pages)
    page_size: int

    @property
    def victims(self) -> list[Entry]:
        return [e for e in self.entries if e.killable]

    def as_dict(self) -> dict[str, Any]:
        return {
            "cgroup": self.cgroup,
            "totalpages": self.totalpages,
            "page_size": self.page_size,
            "entries": [e.as_dict() for e in self.entries],
        }


# ---------------------------------------------------------------- totals


def total_pages(page_size: int | None = None) -> int:
    """totalram_pages + total_swap_pages: what a global OOM scales by."""
    ps = page_size or procfs.PAGE_SIZE
    mi = procfs.meminfo()
    return (mi.get("MemTotal", 0) + mi.get("SwapTotal", 0)) // ps


def cgroup_total_pages(cgroup: str, page_size: int | None = None) -> int:
    """mem_cgroup_get_max() of the cgroup an OOM happens in, for cgroup v2:
    memory.max plus, if the kernel may swap, min(memory.swap.max, swap).

    A cgroup without a limit of its own cannot run out by itself; an OOM
    there is one of the nearest limited ancestor, whose limit is used then,
    and all of RAM+swap if there is none."""
    ps = page_size or procfs.PAGE_SIZE
    limit = cgroups.memory_max(cgroup)
    if limit is None:
        limit = cgroups.effective_memory_limit(cgroup)
    if limit is None:
        return total_pages(ps)
    pages = limit // ps
    swap_total = procfs.meminfo().get("SwapTotal", 0) // ps
    if swap_total and oomstat.swappiness():
        swap_max = cgroups.swap_max(cgroup)
        pages += swap_total if swap_max is None else min(swap_max // ps, swap_total)
    return pages or 1


def badness(rss_pages: int, swap_pages: int, pte_pages: int, adj: int, totalpages: int) -> int | None:
    """oom_badness(): None where the kernel returns LONG_MIN (adj -1000)."""
    if adj <= OOM_SCORE_ADJ_MIN:
        return None
    return rss_pages + swap_pages + pte_pages + adj * (totalpages // 1000)


def oom_score(points: int | None, totalpages: int) -> int:
    """What /proc/<pid>/oom_score shows for these badness points."""
    if points is None:
        return 0
    # C division truncates toward zero.
    q = abs(points) * 1000 // totalpages
    q = q if points >= 0 else -q
    v = (1000 + q) * 2
    return max(0, v // 3 if v >= 0 else -((-v) // 3))


# ---------------------------------------------------------------- ranking


def _sort(entries: list[Entry], key: Any) -> list[Entry]:
    killable = sorted((e for e in entries if e.killable), key=key, reverse=True)
    never = sorted((e for e in entries if not e.killable), key=lambda e: (-e.rss_kb, e.pid))
    out = [_with_rank(e, i + 1) for i, e in enumerate(killable)]
    return out + never


def _with_rank(e: Entry, rank: int) -> Entry:
    return Entry(e.pid, e.uid, e.user, e.comm, e.adj, e.rss_kb, e.oom_score, e.points,
                 e.killable, rank, e.starttime, e.swap_kb, e.pte_kb, e.scan)


def rank_global(include_kernel_threads: bool = False) -> Ranking:
    """Every process in the order a global OOM would take it."""
    ps = procfs.PAGE_SIZE
    totalpages = total_pages(ps)
    per_adj = totalpages // 1000
    users = UserNames()
    # Samples are sorted first and each Entry built once, with its rank:
    # a frozen dataclass costs a few microseconds to build, 10,000 times.
    killable: list[tuple] = []
    never: list[tuple] = []
    sample = oomstat.read_oom_sample
    for pid in procfs.list_pids():
        try:
            p = sample(pid, include_kernel_threads)
        except _SKIP:
            continue  # gone meanwhile, or unreadable
        if p is None:
            continue
        adj = p.oom_score_adj
        rss_kb = p.rss_pages * ps // 1024
        if not p.kthread and pid != 1 and adj > OOM_SCORE_ADJ_MIN:
            killable.append((p.oom_score, p.rss_pages + adj * per_adj, p.starttime, pid, p.uid, p.comm, adj, rss_kb))
        else:
            never.append((-rss_kb, pid, p.starttime, p.uid, p.comm, adj, p.oom_score))
    # as _sort: the kernel's order for the killable, then the rest by size
    killable.sort(key=lambda r: r[:3], reverse=True)
    never.sort(key=lambda r: r[:2])
    entries = [Entry(pid, uid, users(uid), comm, adj, rss_kb, score, points, True, rank, start)
               for rank, (score, points, start, pid, uid, comm, adj, rss_kb) in enumerate(killable, 1)]
    entries += [Entry(pid, uid, users(uid), comm, adj, -neg_rss, score, None, False, None, start)
                for neg_rss, pid, start, uid, comm, adj, score in never]
    return Ranking(entries, None, totalpages, ps)


def rank_cgroup(cgroup: str) -> Ranking:
    """The processes of a cgroup's subtree in the order an OOM of that cgroup
    would take them."""
    cg = cgroups.normalize(cgroup)
    if not cgroups.exists(cg):
        raise FileNotFoundError(f"no cgroup {cg}")
    ps = procfs.PAGE_SIZE
    kb_per_page = ps // 1024
    totalpages = cgroup_total_pages(cg, ps)
    users = UserNames()
    entries: list[Entry] = []
    # cgroups.procs_recursive walks parent first, each cgroup.procs in the
    # order the kernel iterates; the position breaks ties like the kernel.
    for order, pid in enumerate(cgroups.procs_recursive(cg)):
        try:
            name, euid, rss, swap, pte, _ppid = oomstat.read_oom_status(pid)
            adj = procfs.read_oom_score_adj(pid)
        except _SKIP:
            continue
        if swap is None and pte is None:
            continue  # no mm: a kernel thread or a zombie, never a candidate
        pte_pages = (pte or 0) * 1024 // ps
        points = badness(rss // kb_per_page, (swap or 0) // kb_per_page, pte_pages, adj, totalpages)
        killable = pid != 1 and points is not None
        entries.append(Entry(pid, euid, users(euid), name, adj, rss, None, points, killable,
                             None, 0, swap, pte, order))
    # Of equal points the kernel keeps the one scanned last.
    ranked = _sort(entries, key=lambda e: (e.points, e.scan))
    return Ranking(ranked, cg, totalpages, ps)


def rank(cgroup: str | None = None, *, include_kernel_threads: bool = False) -> Ranking:
    """``oomguard top [--cgroup PATH]``."""
    if cgroup is None:
        return rank_global(include_kernel_threads)
    return rank_cgroup(cgroup)
