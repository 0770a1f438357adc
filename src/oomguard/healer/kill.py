"""Ending protected runs, and never signalling what must survive.

The never-kill rules (``Killer.refusal``): root's processes (any of
real/effective/saved uid 0), the database, oomguard itself, and whatever the
injected policy test ``is_exempt(proc)`` exempts. They are checked when a
process is pinned by a pidfd and again right before every signal, so a pid
reused meanwhile, or a process that has become untouchable, is never hit.

Ending one target (``Kill``): SIGTERM, wait, SIGKILL of the run's *own*
cgroup (cgroup.kill) or, for a run without one, of each process through its
pidfd; confirm they are gone, end the run in the registry and tell its
terminal why. Each step is short, so the healer's tick can drive it;
``Kill.at_once`` does all of it in one blocking call.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import select
import signal
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from oomguard.host import cgroups, procfs
from oomguard.runs.lifecycle import RunLifecycle
from oomguard.runs.registry import Run, RunRegistry

# The healer's logger: what is logged here is the healer's doing, and the
# journal names it so.
log = logging.getLogger(__name__)

OOM_SCORE_ADJ_MIN = -1000
KILLED_BY_HEALER = "killed by healer"
# The database's server binaries, matched on the *executable path* (a user
# cannot put files in these directories; comm alone could be forged).
DB_BINARIES = frozenset({"mariadbd", "mysqld", "mariadbd-safe", "mysqld_safe"})
SYSTEM_DIRS = ("/usr/", "/bin/", "/sbin/", "/lib/", "/lib64/", "/opt/")
TTY_PATH = re.compile(r"/dev/(pts/\d+|tty\d+|ttyS\d+)")


# ---------------------------------------------------------------- pidfds


def _pidfd_exited(fd: int) -> bool:
    """A pidfd polls readable once its process has exited (zombies included)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


@dataclass
class Handle:
    """One process pinned by a pidfd: signals go to it or to nobody."""

    pid: int
    starttime: int
    fd: int
    comm: str
    uid: int
    state: str

    def exited(self) -> bool:
        return self.fd < 0 or _pidfd_exited(self.fd)

    def send(self, sig: int) -> bool:
        try:
            signal.pidfd_send_signal(self.fd, sig)
            return True
        except ProcessLookupError:
            return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------- the rules


def is_database(proc: procfs.Proc) -> bool:
    exe = (proc.exe or "").removesuffix(" (deleted)")
    return os.path.basename(exe) in DB_BINARIES and exe.startswith(SYSTEM_DIRS)


class Killer:
    """What the healer may kill, and whom it targets: the never-kill rules,
    pinning by pidfd, and the choice of targets. ``registry`` and
    ``app_cgroup`` tell whose cgroup is a run's own."""

    def __init__(
        self,
        registry: RunRegistry,
        app_cgroup: str | None,
        is_exempt: Callable[[procfs.Proc], bool],
    ):
        self.registry = registry
        self.app_cgroup = app_cgroup
        self.is_exempt = is_exempt

    def refusal(self, proc: procfs.Proc, uids: Sequence[int] | None = None) -> str | None:
        """Why ``proc`` must not be signalled, or None if it may be."""
        if proc.pid == os.getpid():
            return "oomguard itself"
        if proc.uid == 0 or (uids is not None and 0 in uids[:3]):
            return "root's process"
        if is_database(proc):
            return "the database"
        try:
            if self.is_exempt(proc):
                return "exempt by policy"
        except Exception:  # noqa: BLE001 - when in doubt, do not kill
            log.exception("is_exempt(%d) failed; treating it as exempt", proc.pid)
            return "exemption check failed"
        return None

    def pin(
        self, pid: int, expect_start: int | None, require_protected: bool = False
    ) -> tuple[Handle | None, str | None]:
        """A pidfd on ``pid`` if it is the process we mean and may be signalled.

        Inspect, open the pidfd, then check that the pid still has the same
        start time: the pidfd then refers to the inspected process for good,
        and a later pid reuse cannot redirect a signal."""
        proc = procfs.snapshot(pid)
        if proc is None:
            return None, "gone"
        if proc.state == "Z":
            return None, "zombie"
        if expect_start is not None and proc.starttime != expect_start:
            return None, "pid reused"
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None, "gone"
        try:
            status = procfs.read_status(pid)
            same = procfs.starttime_of(pid) == proc.starttime
        except (*procfs.GONE, ValueError, PermissionError):
            os.close(fd)
            return None, "gone"
        if not same:
            os.close(fd)
            return None, "pid reused"
        why = self.refusal(proc, status.uids)
        if why is None and require_protected and proc.oom_score_adj != OOM_SCORE_ADJ_MIN:
            why = "no longer protected"
        if why is not None:
            os.close(fd)
            return None, why
        return Handle(pid, proc.starttime, fd, proc.comm, proc.uid, proc.state), None

    def recheck(self, h: Handle) -> str | None:
        """Right before a signal: the same process, and still one we may signal."""
        if h.exited():
            return "gone"
        proc = procfs.snapshot(h.pid)
        if proc is None or proc.starttime != h.starttime:
            return "gone"
        try:
            uids = procfs.read_status(h.pid).uids
        except (*procfs.GONE, ValueError, PermissionError):
            return "gone"
        why = self.refusal(proc, uids)
        if why is not None:
            log.warning("pid %d (%s) became %s; not signalling it", h.pid, proc.comm, why)
        return why

    def select_targets(
        self, processes: Callable[[], Iterable[procfs.Proc]], uid_range: tuple[int, int]
    ) -> list[Kill]:
        """Every active run with live processes, plus protected (-1000)
        processes of login users (``uid_range``) that belong to no run,
        grouped by owner."""
        targets: list[Kill] = []
        for run in self.registry.active():
            if self.registry.pids(run):
                targets.append(Kill(self, run, run.uid, run.user))
        lo, hi = uid_range
        orphans: dict[int, list[procfs.Proc]] = collections.defaultdict(list)
        for proc in processes():
            if proc.oom_score_adj != OOM_SCORE_ADJ_MIN or proc.state == "Z":
                continue
            if self.registry.run_of(proc.pid, proc.starttime, proc.cgroup) is not None:
                continue
            why = self.refusal(proc)
            if why is None and not lo <= proc.uid <= hi:
                why = f"uid {proc.uid} is not a login user"
            if why is not None:
                log.info("leaving protected pid %d (%s) alone: %s", proc.pid, proc.comm, why)
                continue
            orphans[proc.uid].append(proc)
        for uid, procs in sorted(orphans.items()):
            targets.append(Kill(self, None, uid, _user_name(uid), procs))
        return targets


# ---------------------------------------------------------------- ending one target


class Kill:
    """Ending one protected run (or the protected processes of one uid that
    belong to no run): term(), then kill() after the grace, then finish().
    Each step is short, so the healer's tick can drive it."""

    def __init__(
        self,
        killer: Killer,
        run: Run | None,
        uid: int,
        user: str,
        orphans: Sequence[procfs.Proc] = (),
        reason: str = KILLED_BY_HEALER,
    ):
        self.killer = killer
        self.reason = reason  # the run's end_reason
        self.run = run
        self.uid = uid
        self.user = user
        self.orphans = list(orphans)
        self.handles: dict[tuple[int, int], Handle] = {}
        self.skipped: dict[int, str] = {}  # pid -> why it was left alone
        self.method = "pidfd"
        self.stalled: list[tuple[int, str]] = []  # (pid, state) of R/D tasks at SIGKILL
        self.termed = 0

    @property
    def label(self) -> str:
        if self.run is not None:
            return f"run {self.run.id} of {self.user} ({self.run.command[:80]})"
        return f"protected processes of {self.user} outside any run"

    def _candidates(self) -> list[tuple[int, int | None]]:
        """(pid, expected starttime or None) of what belongs to the target now."""
        if self.run is None:
            return [(p.pid, p.starttime) for p in self.orphans]
        if self.run.cgroup and cgroups.exists(self.run.cgroup):
            return [(pid, None) for pid in cgroups.procs_recursive(self.run.cgroup)]
        # Without a cgroup, registry.pids() has already matched each pid to its
        # recorded start time; pin() checks it again after opening the pidfd.
        return [(pid, procfs.starttime_of(pid)) for pid in self.killer.registry.pids(self.run)]

    def _pin_new(self) -> list[Handle]:
        fresh = []
        for pid, start in self._candidates():
            if any(h.pid == pid for h in self.handles.values()):
                continue
            handle, why = self.killer.pin(pid, start, require_protected=self.run is None)
            if handle is None:
                if why not in ("gone", "zombie"):
                    self.skipped[pid] = why or "?"
                continue
            self.handles[(handle.pid, handle.starttime)] = handle
            fresh.append(handle)
        return fresh

    def term(self) -> None:
        handles = self._pin_new()
        if handles and self.run is not None:
            # Claimed before the signal, so the reaper keeps our reason if it
            # sees the run end first.
            RunLifecycle(self.killer.registry).claim_end(self.run.id, self.reason)
        for handle in handles:
            if self._signal(handle, signal.SIGTERM):
                self.termed += 1
        for pid, why in self.skipped.items():
            log.warning("%s: not signalling pid %d: %s", self.label, pid, why)

    def own_cgroup(self) -> str | None:
        """The run's cgroup if it is its own: not the root, not the app cgroup
        or one of its ancestors, not shared with another active run."""
        if self.run is None or not self.run.cgroup:
            return None
        cg = cgroups.normalize(self.run.cgroup)
        app = cgroups.normalize(self.killer.app_cgroup) if self.killer.app_cgroup else None
        if cg == "/" or (app and (cg == app or app.startswith(cg + "/"))):
            return None
        for other in self.killer.registry.active():
            if other.id != self.run.id and other.cgroup:
                o = cgroups.normalize(other.cgroup)
                if o == cg or o.startswith(cg + "/") or cg.startswith(o + "/"):
                    return None
        return cg if cgroups.exists(cg) else None

    def kill(self) -> None:
        self._pin_new()  # children forked since SIGTERM
        self.stalled = []
        for h in self.handles.values():
            if not h.exited():
                st = procfs.snapshot(h.pid)
                if st is not None and st.starttime == h.starttime and st.state in ("R", "D"):
                    self.stalled.append((h.pid, st.state))
        cg = self.own_cgroup()
        if cg is not None and self._cgroup_safe(cg):
            self.method = "cgroup.kill"
            cgroups.kill(cg)
        else:
            if cg is not None:
                log.warning(
                    "%s: cgroup %s holds processes the healer must not kill; killing one by one",
                    self.label,
                    cg,
                )
            self.method = "pidfd"
        # Also through the pidfds: covers runs without a cgroup, and is
        # harmless after cgroup.kill.
        for h in self.handles.values():
            if not h.exited():
                self._signal(h, signal.SIGKILL)

    def _signal(self, h: Handle, sig: int) -> bool:
        """Signal through the pidfd after the last-moment re-check; a process
        that has become untouchable (setuid root, exempt) is left alone."""
        why = self.killer.recheck(h)
        if why is None:
            return h.send(sig)
        if why != "gone":
            self.skipped[h.pid] = why
        return False

    def _cgroup_safe(self, cg: str) -> bool:
        """Right before cgroup.kill: nothing in it may be exempt."""
        for pid in cgroups.procs_recursive(cg):
            proc = procfs.snapshot(pid)
            if proc is None or proc.state == "Z":
                continue
            why = self.killer.refusal(proc)
            if why is not None:
                self.skipped[pid] = why
                return False
        return True

    def gone(self) -> bool:
        """Nothing that we may kill is left."""
        if any(not h.exited() for h in self.handles.values() if h.pid not in self.skipped):
            return False
        # Anything new (forked meanwhile) that we may kill is "not gone".
        for pid, start in self._candidates():
            if pid in self.skipped:
                continue
            proc = procfs.snapshot(pid)
            if proc is None or proc.state == "Z" or (start is not None and proc.starttime != start):
                continue
            if self.killer.refusal(proc) is None and (
                self.run is not None or proc.oom_score_adj == OOM_SCORE_ADJ_MIN
            ):
                return False
        return True

    def finish(self, why: str) -> dict:
        """Close the pidfds; end the run if nothing of it is left; tell its
        terminal why. The record's action is "killed" (all gone),
        "kill_failed" (something killable survived SIGKILL) or "spared_some"
        (the rest is root's, the database's or exempt, so the run goes on)."""
        gone = self.gone()
        left = []
        for h in self.handles.values():
            if not h.exited() and h.pid not in self.skipped:
                proc = procfs.snapshot(h.pid)
                left.append([h.pid, proc.state if proc else "?"])
            h.close()
        complete = gone and not self.skipped
        if not self.handles and not self.skipped:
            action = "already_gone"  # nothing to signal: the reaper ends it as "exited"
            complete = False
        else:
            action = "killed" if complete else "spared_some" if gone else "kill_failed"
        record: dict[str, Any] = {
            "action": action,
            "target": self.label,
            "run": self.run.id if self.run else None,
            "owner": self.user,
            "uid": self.uid,
            "pids": sorted(h.pid for h in self.handles.values()),
            "method": self.method,
            "stalled": [list(s) for s in self.stalled],
            "skipped": {str(k): v for k, v in self.skipped.items()},
            "reason": why,
        }
        if left:
            record["left"] = left
        if self.run is not None:
            record["command"] = self.run.command
            if complete:
                self._end_run(self.reason)
            else:
                # Something of it still runs: take back the claim made at SIGTERM.
                RunLifecycle(self.killer.registry).withdraw_claim(self.run.id, self.reason)
            if complete and self.run.tty:
                record["told_tty"] = tell_tty(self.run.tty, self.run.uid, self._message(why))
        return record

    def _end_run(self, reason: str) -> None:
        # The lifecycle removes the run's own cgroup and records the end once;
        # the reaper then emits run_end for it.
        if self.run is not None:
            RunLifecycle(self.killer.registry).end(self.run.id, reason)

    def _message(self, why: str) -> str:
        run = self.run
        assert run is not None
        return f"oomguard: protected run {run.id} ({run.command[:60]}) was stopped: {why}"

    def at_once(self, term_timeout: float, kill_timeout: float, why: str) -> dict:
        """term(), up to ``term_timeout`` for it to go, kill() if it has not,
        up to ``kill_timeout`` more, then finish(why): the record. Blocks."""
        self.term()
        deadline = time.monotonic() + term_timeout
        while not self.gone() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.gone():
            self.kill()
            deadline = time.monotonic() + kill_timeout
            while not self.gone() and time.monotonic() < deadline:
                time.sleep(0.02)
        return self.finish(why)

    def close(self) -> None:
        """Close the pidfds (on shutdown, with the kill unfinished)."""
        for h in self.handles.values():
            h.close()


# ---------------------------------------------------------------- helpers


def tell_tty(path: str, uid: int, text: str, limit: int = 400) -> bool:
    """Write one line to a run's terminal without ever blocking: O_NONBLOCK
    (a stopped or full tty gives EAGAIN and we give up), O_NOCTTY (never
    acquire it), one bounded write, and only to a terminal device that the
    run's owner owns (the path comes from the registry, not from the user)."""
    if not TTY_PATH.fullmatch(path):
        return False
    flags = os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISCHR(st.st_mode) or st.st_uid != uid:
            return False
        data = ("\r\n" + text.replace("\n", " ").strip()[:limit] + "\r\n").encode(
            "utf-8", "replace"
        )
        os.write(fd, data)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
