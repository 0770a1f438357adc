"""The registry of protected runs: what the broker granted, kept across restarts.

A run (run.py) is one grant. Descendants of the run live in the cgroup the
broker made for it (only root can move them out), which is how a run is
followed after its first process exits, as with ``screen -d -m``; runs
without one, or in a cgroup their user owns, are followed by fork events
(members.py). Everything later features
need (the healer's kill, attribution of OOM kills, the policy's hands-off
rule) reads this registry.

The registry is the store; lifecycle.py is the one writer of a run's life
(begin, members, end). Lookups go through indexes of the active runs (by
first process, by pid, by cgroup), so a grant or a fork costs the same with
one run recorded or a thousand. Ended runs are forgotten past a bound (the
event store keeps their history).
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from oomguard.host import cgroups, procfs
from oomguard.host import statefile as state
from oomguard.runs.members import Members
from oomguard.runs.run import Run, follows
from oomguard.runs.store import StateWriter

KEEP_ENDED = 500  # ended runs kept for `oomguard runs --all`
KEEP_ENDED_SECONDS = 7 * 24 * 3600  # and none ended longer ago than this


class ReadOnlyRegistry(RuntimeError):
    """A change was asked of a registry opened only to read."""


class RunRegistry:
    """Thread-safe. Changes are written atomically to ``path``: at once by
    default, or, with ``deferred``, by whoever calls ``flush`` (the daemon's
    reaper, every half second), so that no change waits on the disk."""

    def __init__(
        self,
        path: str | Path,
        boot_id: str | None = None,
        *,
        deferred: bool = False,
        read_only: bool = False,
        keep_ended: int = KEEP_ENDED,
        keep_ended_seconds: float = KEEP_ENDED_SECONDS,
    ):
        self.path = Path(path)
        self.boot_id = boot_id or procfs.boot_id()
        self.deferred = deferred
        self.read_only = read_only
        self.keep_ended = keep_ended
        self.keep_ended_seconds = keep_ended_seconds
        # Public: the policy holds it from its protection check to its write,
        # and the broker from registering a grant to writing -1000.
        self.lock = threading.RLock()
        self._lock = self.lock
        self._runs: dict[int, Run] = {}
        self._next_id = 1
        # Indexes of the active runs.
        self._by_key: dict[tuple[int, int], int] = {}
        self._by_pid: dict[int, int] = {}
        self._by_cgroup: dict[str, int] = {}
        self._active_of_uid: dict[int, set[int]] = defaultdict(set)
        self._members = Members()
        # Runs ended but not yet handed to the reaper's caller (for run_end).
        self._unannounced: list[int] = []
        self._encoded: dict[int, tuple[Run, str]] = {}  # run id -> (the version encoded, its JSON)
        self.writer = StateWriter(self.path, self.lock, self._snapshot)
        self._load()

    @classmethod
    def open_read_only(cls, path: str | Path) -> RunRegistry:
        """A view of the daemon's registry for read-only commands: it reads
        runs.json and never writes it."""
        return cls(path, read_only=True)

    # ------------------------------------------------------------ persistence

    def _load(self) -> None:
        data = state.read_json(self.path, {}) or {}
        self._next_id = int(data.get("next_id", 1))
        same_boot = data.get("boot_id") == self.boot_id
        lost = False
        for raw in data.get("runs", []):
            try:
                run = Run(**raw)
            except TypeError:
                continue
            if run.active and not same_boot:
                run = replace(run, ended=time.time(), end_reason="lost at reboot")
                lost = True
            self._runs[run.id] = run
            self._index(run)
        if same_boot:
            for k in data.get("members", []):
                self._members.add((int(k[0]), int(k[1])), int(k[2]))
            self._unannounced = [int(i) for i in data.get("unannounced", []) if int(i) in self._runs]
        self.writer.mark_written()
        if lost:
            self.writer.changed()

    def _snapshot(self) -> str:
        """runs.json's text. Each run is encoded once per version (a Run is
        replaced, never changed), so a write with hundreds of ended runs
        only encodes what changed; asdict's deep copy and encoding every
        run again were most of a grant's cost with a big registry."""
        encoded: dict[int, tuple[Run, str]] = {}
        for rid, run in self._runs.items():
            cached = self._encoded.get(rid)
            if cached is None or cached[0] is not run:
                cached = (run, json.dumps({**vars(run), "extra": run.extra}, sort_keys=True))
            encoded[rid] = cached
        self._encoded = encoded
        head = json.dumps({
            "boot_id": self.boot_id,
            "next_id": self._next_id,
            "members": self._members.rows(),
            "unannounced": list(self._unannounced),
        }, sort_keys=True)
        return head[:-1] + ', "runs": [' + ", ".join(text for _, text in encoded.values()) + "]}"

    def _changed(self) -> None:
        """Called with the lock held after every change."""
        if self.read_only:
            raise ReadOnlyRegistry(f"{self.path} is open read-only")
        self.writer.changed()

    def _save_soon(self) -> None:
        """Called after the lock is released: write now unless deferred."""
        if not self.deferred and not self.read_only:
            self.writer.flush()

    def flush(self) -> bool:
        """Write pending changes; False (logged) if the disk refused them."""
        return True if self.read_only else self.writer.flush()

    # ------------------------------------------------------------ indexes

    def _index(self, run: Run) -> None:
        if not run.active:
            return
        self._by_key[run.key] = run.id
        self._by_pid[run.pid] = run.id
        if run.cgroup:
            self._by_cgroup[cgroups.normalize(run.cgroup)] = run.id
        self._active_of_uid[run.uid].add(run.id)

    def _unindex(self, run: Run) -> None:
        if self._by_key.get(run.key) == run.id:
            del self._by_key[run.key]
        if self._by_pid.get(run.pid) == run.id:
            del self._by_pid[run.pid]
        if run.cgroup and self._by_cgroup.get(cgroups.normalize(run.cgroup)) == run.id:
            del self._by_cgroup[cgroups.normalize(run.cgroup)]
        self._active_of_uid[run.uid].discard(run.id)
        if not self._active_of_uid[run.uid]:
            del self._active_of_uid[run.uid]

    def forget_member(self, pid: int) -> None:
        """A process exited: if it was a member, it no longer is (a pid index,
        so an exit costs the same however many processes runs have)."""
        with self._lock:
            if not self._members.forget_pid(pid):
                return
            self._changed()
        self._save_soon()

    def _put(self, run: Run) -> None:
        old = self._runs.get(run.id)
        if old is not None:
            self._unindex(old)
        self._runs[run.id] = run
        self._index(run)

    # ------------------------------------------------------------ changes

    def new_id(self) -> int:
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            self._changed()
        return rid

    def claim_id(self, run_id: int) -> bool:
        """Take ``run_id`` for a run found again (adoption.py) if no run has it."""
        with self._lock:
            if run_id in self._runs or run_id < 1:
                return False
            self._next_id = max(self._next_id, run_id + 1)
            self._changed()
        return True

    def add(self, run: Run) -> None:
        with self._lock:
            self._put(run)
            self._changed()
        self._save_soon()

    def update(self, run_id: int, **changes: object) -> Run | None:
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return None
            run = replace(run, **changes)
            self._put(run)
            if not run.active:
                self._members.drop_run(run_id)
            self._changed()
        self._save_soon()
        return run

    def finish(self, run_id: int, **changes: object) -> Run | None:
        """End an active run once (lifecycle.py's to call): ``ended`` and the
        given fields are set, its members forgotten, and the run is handed to
        the next ``take_ended``. None if it had ended already."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or not run.active:
                return None
            changes.setdefault("ended", time.time())
            run = replace(run, **changes)
            self._put(run)
            self._members.drop_run(run_id)
            self._unannounced.append(run_id)
            self._changed()
        self._save_soon()
        return run

    def take_ended(self) -> list[Run]:
        """The runs ended since the last call, oldest first (for run_end)."""
        with self._lock:
            if not self._unannounced:
                return []
            out = [self._runs[i] for i in self._unannounced if i in self._runs]
            self._unannounced = []
            self._changed()
        self._save_soon()
        return out

    def discard(self, run_id: int) -> None:
        """Forget a run whose grant did not go through."""
        with self._lock:
            run = self._runs.pop(run_id, None)
            if run is None:
                return
            self._unindex(run)
            self._members.drop_run(run_id)
            self._changed()
        self._save_soon()

    def add_member(self, key: tuple[int, int], run_id: int) -> None:
        with self._lock:
            self._members.add(key, run_id)
            self._changed()
        self._save_soon()

    def forget_ended(self, keep: int | None = None, max_age: float | None = None, now: float | None = None) -> int:
        """Drop the oldest ended runs beyond ``keep``, and those ended more
        than ``max_age`` seconds ago (the event store has them); how many."""
        keep = self.keep_ended if keep is None else keep
        max_age = self.keep_ended_seconds if max_age is None else max_age
        now = time.time() if now is None else now
        with self._lock:
            pending = set(self._unannounced)
            ended = sorted((r for r in self._runs.values() if not r.active and r.id not in pending),
                           key=lambda r: r.id)
            drop = ended[:-keep] if keep else ended
            drop += [r for r in ended[len(drop):] if r.ended is not None and now - r.ended > max_age]
            for r in drop:
                del self._runs[r.id]
            if drop:
                self._changed()
        if drop:
            self._save_soon()
        return len(drop)

    # ------------------------------------------------------------ queries

    def get(self, run_id: int) -> Run | None:
        with self._lock:
            return self._runs.get(run_id)

    def all(self) -> list[Run]:
        with self._lock:
            return sorted(self._runs.values(), key=lambda r: r.id)

    def active(self) -> list[Run]:
        with self._lock:
            ids = {i for ids in self._active_of_uid.values() for i in ids}
            return sorted((self._runs[i] for i in ids), key=lambda r: r.id)

    def active_count(self, uid: int) -> int:
        with self._lock:
            return len(self._active_of_uid.get(uid, ()))

    def by_pid(self, pid: int) -> Run | None:
        """The active run whose first process has this pid."""
        with self._lock:
            rid = self._by_pid.get(pid)
            return self._runs[rid] if rid is not None else None

    def by_cgroup(self, cgroup: str) -> Run | None:
        """The active run whose own cgroup this is (not one inside it)."""
        with self._lock:
            rid = self._by_cgroup.get(cgroups.normalize(cgroup))
            return self._runs[rid] if rid is not None else None

    def run_of(self, pid: int, starttime: int, cgroup: str | None) -> Run | None:
        """The active run a process belongs to: its first process, anything in
        its cgroup subtree, or a member followed through fork events."""
        with self._lock:
            rid = self._by_key.get((pid, starttime))
            if rid is None and cgroup:
                for cg in cgroups.lineage(cgroup):
                    rid = self._by_cgroup.get(cg)
                    if rid is not None:
                        break
                else:
                    rid = self._by_cgroup.get("/") if cgroups.normalize(cgroup) == "/" else None
            if rid is None:
                rid = self._members.run_of((pid, starttime))
            run = self._runs.get(rid) if rid is not None else None
            return run if run is not None and run.active else None

    def is_protected(self, pid: int, starttime: int, cgroup: str | None) -> bool:
        return self.run_of(pid, starttime, cgroup) is not None

    def on_fork(self, parent_pid: int, parent_start: int | None, child_pid: int, child_start: int | None) -> None:
        """Follow runs without a cgroup, and runs whose cgroup the user could
        leave (``follows``), through their descendants; any other run is
        followed by its cgroup, at no cost per fork."""
        if child_start is None:
            return  # gone already: nothing to follow
        with self._lock:
            if parent_start is None:
                # The parent exited before we looked. Events come in order, so
                # its exit is not handled yet: the pid is still the one we know.
                rid = self._by_pid.get(parent_pid)
                if rid is not None and self._runs[rid].exit_status is not None:
                    rid = None  # that first process's exit was handled: another process
                if rid is None:
                    rid = self._members.run_of_pid(parent_pid)
            else:
                rid = self._by_key.get((parent_pid, parent_start))
                if rid is None:
                    rid = self._members.run_of((parent_pid, parent_start))
            run = self._runs.get(rid) if rid is not None else None
            if run is None or not run.active or not follows(run):
                return
            self._members.add((child_pid, child_start), run.id)
            self._changed()
        self._save_soon()

    def members(self, run: Run) -> list[tuple[int, int]]:
        with self._lock:
            return self._members.of_run(run.id)

    def alive(self, run: Run) -> bool:
        """Whether anything of the run still runs: never ended while a
        followed member lives, wherever it moved."""
        if run.cgroup and cgroups.exists(run.cgroup) and cgroups.populated(run.cgroup):
            return True
        # Also with a cgroup: a systemd scope exists a moment before its pid
        # is moved in, and a reaper looking then must not end the run.
        if procfs.running(run.pid, run.starttime):
            return True
        return any(procfs.running(p, s) for p, s in self.members(run))

    def pids(self, run: Run) -> list[int]:
        """Live processes of the run: its cgroup's, and followed members
        wherever they are."""
        inside, outside = self.processes(run)
        return inside + [p for p, _ in outside if p not in inside]

    def processes(self, run: Run) -> tuple[list[int], list[tuple[int, int]]]:
        """The run's live processes: the pids in its cgroup (when it has
        one), and (pid, start time) of the others, its first process (when
        it has no cgroup) and its followed members."""
        if run.cgroup and cgroups.exists(run.cgroup):
            inside, known = cgroups.procs_recursive(run.cgroup), self.members(run)
        else:
            inside, known = [], [(run.pid, run.starttime), *self.members(run)]
        return inside, [(p, s) for p, s in known if p not in inside and procfs.running(p, s)]

    def reap(self) -> list[Run]:
        """End the runs of which nothing is left (see lifecycle.RunLifecycle.reap)."""
        from oomguard.runs.lifecycle import RunLifecycle  # the lifecycle builds on this module

        return RunLifecycle(self).reap()
