"""Ending protected runs: whom the healer targets, and ending one target.

``Killer.select_targets`` names every active run with live processes, plus
the protected (-1000) processes of login users that belong to no run.
Ending one target (``Kill``): SIGTERM, wait, SIGKILL of the run's *own*
cgroup (cgroup.kill) or, for a run without one, of each process through its
pidfd; confirm they are gone, end the run through its lifecycle and tell its
terminal why. Each step is short, so the healer's tick can drive it;
``Kill.at_once`` does all of it in one blocking call. Every signal passes
guard.Guard's never-kill rules right before it is sent.
"""

from __future__ import annotations

import collections
import logging
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from oomguard.config.policy import OOM_SCORE_ADJ_MIN
from oomguard.healer.guard import Guard, Handle
from oomguard.healer.tty import tell_tty
from oomguard.host import cgroups, procfs, users
from oomguard.runs.lifecycle import RunLifecycle
from oomguard.runs.registry import RunRegistry
from oomguard.runs.run import Run

log = logging.getLogger(__name__)

KILLED_BY_HEALER = "killed by healer"
# listings of a target that gone() checks before it calls a moving one "not gone"
GONE_LISTINGS = 8


class Killer:
    """Whom the healer ends. ``registry`` and ``app_cgroup`` tell whose
    cgroup is a run's own; ``guard`` vets every process."""

    def __init__(self, registry: RunRegistry, app_cgroup: str | None, guard: Guard):
        self.registry = registry
        self.app_cgroup = app_cgroup
        self.guard = guard

    def select_targets(
        self, processes: Callable[[], Iterable[procfs.Proc]], sweepable: Callable[[int], bool]
    ) -> list[Kill]:
        """Every active run with live processes, plus protected (-1000)
        processes that belong to no run of the users ``sweepable`` names
        (login users and those allowed to ask), grouped by owner."""
        targets: list[Kill] = []
        for run in self.registry.active():
            if self.registry.pids(run):
                targets.append(Kill(self, run, run.uid, run.user))
        orphans: dict[int, list[procfs.Proc]] = collections.defaultdict(list)
        for proc in processes():
            if proc.oom_score_adj != OOM_SCORE_ADJ_MIN or proc.state == "Z":
                continue
            if self.registry.run_of(proc.pid, proc.starttime, proc.cgroup) is not None:
                continue
            why = self.guard.refusal(proc)
            if why is None and not sweepable(proc.uid):
                why = f"uid {proc.uid} is neither a login user nor allowed to ask for protection"
            if why is not None:
                log.info("leaving protected pid %d (%s) alone: %s", proc.pid, proc.comm, why)
                continue
            orphans[proc.uid].append(proc)
        for uid, procs in sorted(orphans.items()):
            targets.append(Kill(self, None, uid, users.name_of(uid) or str(uid), procs))
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
        self.stalled: list[tuple[int, str]] = []  # (pid, state) of R/D tasks at the first SIGKILL
        self.kill_rounds = 0
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
        # Outside a cgroup, by their recorded start time (followed members,
        # wherever they moved); pin() checks it again after opening the pidfd.
        inside, outside = self.killer.registry.processes(self.run)
        return [(pid, None) for pid in inside] + outside

    def _pin_new(self) -> list[Handle]:
        fresh = []
        for pid, start in self._candidates():
            if any(h.pid == pid for h in self.handles.values()):
                continue
            handle, why = self.killer.guard.pin(pid, start, require_protected=self.run is None,
                                                in_run=self.run is not None)  # fmt: skip
            if handle is None:
                if why not in ("gone", "zombie"):
                    self.skipped[pid] = why or "?"
                continue
            if self.run is not None and handle.uid != self.run.uid:
                handle.close()  # a run is its owner's: never another user's process in it
                self.skipped[pid] = "another user's process"
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
        """SIGKILL what is left; called again while anything of it lives, it
        selects again (forks since the last call)."""
        first = not self.kill_rounds
        self.kill_rounds += 1
        if first:
            for h in self.handles.values():
                if not h.exited():
                    st = procfs.snapshot(h.pid)
                    if st is not None and st.starttime == h.starttime and st.state in ("R", "D"):
                        self.stalled.append((h.pid, st.state))
        cg = self.own_cgroup()
        frozen = None
        if cg is not None and self._cgroup_safe(cg):
            self.method = "cgroup.kill"
            cgroups.kill(cg)
        else:
            if cg is not None and first:
                log.warning("%s: cgroup %s holds processes the healer must not kill; killing one by one",
                            self.label, cg)  # fmt: skip
            # Frozen first, so nothing of it forks between selecting and signalling.
            frozen = cg if cg is not None and cgroups.freeze(cg) else None
            self.method = "pidfd+freeze" if frozen else "pidfd"
        self._pin_new()  # children forked since SIGTERM (or the last call)
        try:
            # Also through the pidfds: covers runs without a cgroup, and is
            # harmless after cgroup.kill.
            for h in self.handles.values():
                if not h.exited():
                    self._signal(h, signal.SIGKILL)
        finally:
            if frozen is not None:
                cgroups.thaw(frozen)  # what is spared runs on

    def _signal(self, h: Handle, sig: int) -> bool:
        """Signal through the pidfd after the last-moment re-check; a process
        that has become untouchable (setuid root, exempt) is left alone."""
        why = self.killer.guard.recheck(h)
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
            why = self.killer.guard.refusal(proc, in_run=self.run is not None)
            if why is not None:
                self.skipped[pid] = why
                return False
        return True

    def gone(self) -> bool:
        """Nothing that we may kill is left."""
        if any(not h.exited() for h in self.handles.values() if h.pid not in self.skipped):
            return False
        # Anything new (forked meanwhile) that we may kill is "not gone". A
        # fork chain renews its pid faster than a listing is checked: each
        # one listed may have forked and exited by its turn. So list again
        # until a listing shows nobody not checked before.
        seen: set[tuple[int, int | None]] = set()
        for _ in range(GONE_LISTINGS):
            new = [(pid, start) for pid, start in self._candidates()
                   if pid not in self.skipped and (pid, start) not in seen]  # fmt: skip
            if not new:
                return True
            seen.update(new)
            for pid, start in new:
                proc = procfs.snapshot(pid)
                if proc is None or proc.state == "Z" or (start is not None and proc.starttime != start):
                    continue
                if self.killer.guard.refusal(proc, in_run=self.run is not None) is None and (
                    self.run is not None or proc.oom_score_adj == OOM_SCORE_ADJ_MIN
                ):
                    return False
        return False  # still renewing after GONE_LISTINGS listings: not gone

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
            while time.monotonic() < deadline:
                time.sleep(0.02)
                if self.gone():
                    break
                self.kill()  # select again: a fork chain is caught by the next round
        return self.finish(why)

    def close(self) -> None:
        """Close the pidfds (on shutdown, with the kill unfinished)."""
        for h in self.handles.values():
            h.close()
