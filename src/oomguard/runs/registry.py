"""The registry of protected runs: what the broker granted, kept across restarts.

A run is one grant: the process that asked, identified by (pid, start time),
plus the cgroup the broker made for it. Descendants of the run live in that
cgroup (only root can move them out), which is how a run is followed after
its first process exits, as with ``screen -d -m``. Everything later features
need (the healer's kill, attribution of OOM kills, the policy's hands-off
rule) reads this registry.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from oomguard.host import cgroups, procfs
from oomguard.host import statefile as state


@dataclass(frozen=True)
class Run:
    id: int
    uid: int
    user: str
    pid: int
    starttime: int  # clock ticks after boot, field 22 of /proc/<pid>/stat
    started: float  # wall clock, for people
    command: str  # as the kernel showed it, truncated
    cgroup: str | None  # the run's own cgroup, None if one could not be made
    tty: str | None = None  # controlling terminal, to tell the owner why a run was stopped
    ended: float | None = None
    exit_status: int | None = None  # exit code, or -N for death by signal N
    peak_memory: int | None = None
    end_reason: str | None = None  # "exited", "killed by healer", "boot", ...
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.starttime)

    @property
    def active(self) -> bool:
        return self.ended is None


def decode_wait_status(status: int) -> int:
    """A wait(2) status as a shell shows it: exit code, or -signal."""
    if status & 0x7F == 0:
        return (status >> 8) & 0xFF
    return -(status & 0x7F)


class RunRegistry:
    """Thread-safe; persisted atomically on every change."""

    def __init__(self, path: str | Path, boot_id: str | None = None):
        self.path = Path(path)
        self.boot_id = boot_id or procfs.boot_id()
        # Public: the policy holds it from its protection check to its write,
        # and the broker from registering a grant to writing -1000.
        self.lock = threading.RLock()
        self._lock = self.lock
        self._runs: dict[int, Run] = {}
        self._next_id = 1
        # (pid, starttime) of processes that belong to a run but live outside
        # its cgroup (no cgroup could be made): followed through fork events.
        self._members: dict[tuple[int, int], int] = {}
        self._load()

    # ------------------------------------------------------------ persistence

    def _load(self) -> None:
        data = state.read_json(self.path, {}) or {}
        self._next_id = int(data.get("next_id", 1))
        same_boot = data.get("boot_id") == self.boot_id
        for raw in data.get("runs", []):
            try:
                run = Run(**raw)
            except TypeError:
                continue
            if run.active and not same_boot:
                run = replace(run, ended=time.time(), end_reason="lost at reboot")
            self._runs[run.id] = run
        if same_boot:
            for k in data.get("members", []):
                self._members[(int(k[0]), int(k[1]))] = int(k[2])

    def _save(self) -> None:
        state.write_json_atomic(
            self.path,
            {
                "boot_id": self.boot_id,
                "next_id": self._next_id,
                "runs": [asdict(r) for r in self._runs.values()],
                "members": [[p, s, r] for (p, s), r in self._members.items()],
            },
        )

    # ------------------------------------------------------------ changes

    def new_id(self) -> int:
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            return rid

    def add(self, run: Run) -> None:
        with self._lock:
            self._runs[run.id] = run
            self._save()

    def update(self, run_id: int, **changes: object) -> Run | None:
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return None
            run = replace(run, **changes)
            self._runs[run_id] = run
            self._save()
            return run

    def discard(self, run_id: int) -> None:
        """Forget a run whose grant did not go through."""
        with self._lock:
            if self._runs.pop(run_id, None) is not None:
                self._save()

    def add_member(self, key: tuple[int, int], run_id: int) -> None:
        with self._lock:
            self._members[key] = run_id
            self._save()

    def forget_ended(self, keep: int = 500) -> None:
        """Drop the oldest ended runs beyond ``keep`` (the event store has them)."""
        with self._lock:
            ended = sorted((r for r in self._runs.values() if not r.active), key=lambda r: r.id)
            for r in ended[:-keep] if keep else ended:
                del self._runs[r.id]
            self._save()

    # ------------------------------------------------------------ queries

    def get(self, run_id: int) -> Run | None:
        with self._lock:
            return self._runs.get(run_id)

    def all(self) -> list[Run]:
        with self._lock:
            return sorted(self._runs.values(), key=lambda r: r.id)

    def active(self) -> list[Run]:
        return [r for r in self.all() if r.active]

    def by_pid(self, pid: int) -> Run | None:
        """The active run whose first process has this pid."""
        with self._lock:
            for r in self._runs.values():
                if r.active and r.pid == pid:
                    return r
        return None

    def run_of(self, pid: int, starttime: int, cgroup: str | None) -> Run | None:
        """The active run a process belongs to: its first process, anything in
        its cgroup subtree, or a member followed through fork events."""
        with self._lock:
            for r in self._runs.values():
                if not r.active:
                    continue
                if (pid, starttime) == r.key:
                    return r
                if r.cgroup and cgroup and (cgroup == r.cgroup or cgroup.startswith(r.cgroup + "/")):
                    return r
            rid = self._members.get((pid, starttime))
            run = self._runs.get(rid) if rid is not None else None
            return run if run is not None and run.active else None

    def is_protected(self, pid: int, starttime: int, cgroup: str | None) -> bool:
        return self.run_of(pid, starttime, cgroup) is not None

    def on_fork(self, parent_pid: int, parent_start: int | None, child_pid: int, child_start: int | None) -> None:
        """Follow runs without a cgroup through their descendants."""
        if parent_start is None or child_start is None:
            return
        with self._lock:
            rid = None
            for r in self._runs.values():
                if r.active and r.key == (parent_pid, parent_start):
                    rid = r.id
            rid = rid or self._members.get((parent_pid, parent_start))
            if rid is not None:
                self.add_member((child_pid, child_start), rid)

    def alive(self, run: Run) -> bool:
        """Whether anything of the run still runs."""
        if run.cgroup and cgroups.exists(run.cgroup):
            return cgroups.populated(run.cgroup)
        if procfs.running(run.pid, run.starttime):
            return True
        with self._lock:
            members = [k for k, rid in self._members.items() if rid == run.id]
        return any(procfs.running(p, s) for p, s in members)

    def pids(self, run: Run) -> list[int]:
        """Live processes of the run."""
        if run.cgroup and cgroups.exists(run.cgroup):
            return cgroups.procs_recursive(run.cgroup)
        out = [run.pid] if procfs.running(run.pid, run.starttime) else []
        with self._lock:
            members = [k for k, rid in self._members.items() if rid == run.id]
        out += [p for p, s in members if procfs.running(p, s)]
        return out

    def reap(self) -> list[Run]:
        """End the runs of which nothing is left; returns the runs ended now.
        The cgroup's memory.peak is read before the cgroup is removed."""
        ended = []
        for run in self.active():
            if self.alive(run):
                continue
            peak = cgroups.memory_peak(run.cgroup) if run.cgroup else None
            if run.cgroup:
                cgroups.remove(run.cgroup)
            done = self.update(
                run.id,
                ended=time.time(),
                peak_memory=peak if peak is not None else run.peak_memory,
                end_reason=run.end_reason or "exited",
            )
            with self._lock:
                for k in [k for k, rid in self._members.items() if rid == run.id]:
                    del self._members[k]
            if done:
                ended.append(done)
        return ended
