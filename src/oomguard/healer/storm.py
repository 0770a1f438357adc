"""The storm guard and the livelock watch on the app cgroup's memory.events.

``StormWatch.watch(now)`` samples the ``oom`` and ``oom_kill`` counters of the
app cgroup (the healer calls it from every tick) and computes the OOM-kill
rate and the oom rate over about the last second:

- an OOM-kill *storm* (``storm_kills_per_second`` or more) makes it SIGKILL
  the policy's non-essential app processes, at most once a second, unless
  ``permissive``; protected processes are left to the grace. Each one is
  pinned by a pidfd through guard.Guard, so the never-kill rules are checked
  right before its signal;
- a *livelock*, ``oom`` climbing while ``oom_kill`` stays put (only
  unkillable tasks are left), is reported at once as an event, a metric and
  in the status. It does not shorten the grace: that decides when the healer
  acts. This is the app cgroup's own verdict (``oomguard_healer_livelock``);
  the kernel log's (``oomguard_oom_livelock``) is forensics/oomwatch.py's.

Events go through the injected ``record(kind, data, uids)`` (the healer keeps
them for its status and stores them), figures through the typed hooks: this
class is the only writer of the kill rate and of the app cgroup's livelock.
"""

from __future__ import annotations

import collections
import logging
import signal
from collections.abc import Callable, Iterable

from oomguard.config import HealerConfig
from oomguard.config.policy import OOM_SCORE_ADJ_MIN
from oomguard.healer.actions import decide
from oomguard.healer.grace import fmt_duration
from oomguard.healer.guard import Guard
from oomguard.host import cgroups, procfs
from oomguard.runs.registry import RunRegistry
from oomguard.telemetry.hooks import NO_HOOKS, Hooks

log = logging.getLogger(__name__)

RecordFn = Callable[[str, dict, Iterable[int]], None]


class StormWatch:
    """See the module docstring. ``app_cgroup`` is the cgroup watched (none:
    nothing is watched); ``registry`` tells which processes are protected
    runs; ``guard`` pins and vets every process before its signal;
    ``wall()`` is wall time, for the livelock's start."""

    def __init__(
        self,
        cfg: HealerConfig,
        app_cgroup: str | None,
        registry: RunRegistry,
        guard: Guard,
        nonessential_pids: Callable[[], list[int]],
        record: RecordFn,
        wall: Callable[[], float],
        hooks: Hooks = NO_HOOKS,
        permissive_for: Callable[[int], bool] = lambda uid: False,
    ):
        self.cfg = cfg
        self.app_cgroup = app_cgroup
        self.registry = registry
        self.guard = guard
        self.nonessential_pids = nonessential_pids
        self._record = record
        self._hooks = hooks
        self._wall = wall
        self._permissive_for = permissive_for
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque()
        self.kill_rate = 0.0
        self.oom_rate = 0.0
        self.storm_active = False
        self._storm_next = 0.0
        self.livelock_since: float | None = None
        self.livelock_wall: float | None = None
        self.watching = False  # the last sample read the app cgroup's memory.events

    def _decide(self, message: str, *args: object) -> None:
        decide(log, self.cfg.dry_run, message, *args)

    def watch(self, now: float) -> None:
        """One sample at ``now`` (CLOCK_BOOTTIME seconds), then act on it."""
        if not self.app_cgroup:
            return
        ev = cgroups.memory_events(self.app_cgroup)
        self.watching = bool(ev)
        if not ev:
            return
        oom, kills = ev.get("oom", 0), ev.get("oom_kill", 0)
        s = self._samples
        if s and (oom < s[-1][1] or kills < s[-1][2]):
            s.clear()  # the cgroup was recreated: counters restarted
        if s and now <= s[-1][0]:
            return
        s.append((now, oom, kills))
        while len(s) > 3 and s[1][0] <= now - 5.0:
            s.popleft()
        # kills per second over about the last second
        base = s[0]
        for sample in s:
            if sample[0] <= now - 1.0:
                base = sample
        span = max(now - base[0], 1.0)
        self.kill_rate = (kills - base[2]) / span
        self.oom_rate = (oom - base[1]) / span
        self._storm(now)
        self._livelock(now)
        self._publish()

    # ------------------------------------------------------------ storm guard

    def _storm(self, now: float) -> None:
        threshold = self.cfg.storm_kills_per_second
        if self.kill_rate < threshold:
            if self.storm_active:
                log.info("OOM-kill storm over (%.1f kills/s)", self.kill_rate)
            self.storm_active = False
            return
        first = not self.storm_active
        self.storm_active = True
        if not self.cfg.enabled:
            return
        if self.cfg.permissive:
            if first:
                self._decide(
                    "OOM-kill storm (%.1f kills/s >= %g): permissive, killing nothing",
                    self.kill_rate,
                    threshold,
                )
                self._record(
                    "storm",
                    {"action": "none", "reason": "permissive", "kills_per_second": self.kill_rate},
                    (),
                )
            return
        if now < self._storm_next:
            return
        self._storm_next = now + 1.0
        killed, skipped, uids = [], {}, set()
        try:
            pids = list(self.nonessential_pids())
        except Exception:  # noqa: BLE001
            log.exception("nonessential_pids() failed")
            pids = []
        for pid in pids:
            proc = procfs.snapshot(pid)
            if proc is None or proc.state == "Z":
                continue
            if proc.oom_score_adj == OOM_SCORE_ADJ_MIN or self.registry.run_of(
                pid, proc.starttime, proc.cgroup
            ):
                skipped[str(pid)] = "protected: the grace decides"
                continue
            if self._permissive_for(proc.uid):
                skipped[str(pid)] = "permissive: its owner chose it (oomguard settings)"
                continue
            if self.cfg.dry_run:
                why = self.guard.refusal(proc)
                if why:
                    skipped[str(pid)] = why
                else:
                    killed.append({"pid": pid, "comm": proc.comm, "uid": proc.uid})
                    uids.add(proc.uid)
                continue
            handle, why = self.guard.pin(pid, proc.starttime)
            if handle is None:
                if why not in ("gone", "zombie"):
                    skipped[str(pid)] = why or "?"
                continue
            try:
                if handle.send(signal.SIGKILL):
                    killed.append({"pid": pid, "comm": handle.comm, "uid": handle.uid})
                    uids.add(handle.uid)
            finally:
                handle.close()
        if killed or first:
            self._decide(
                "OOM-kill storm (%.1f kills/s >= %g): %s non-essential processes %s",
                self.kill_rate, threshold, "would kill" if self.cfg.dry_run else "killed",
                [k["pid"] for k in killed],
            )  # fmt: skip
            self._record(
                "storm",
                {
                    "action": "kill_nonessential",
                    "kills_per_second": self.kill_rate,
                    "killed": killed,
                    "skipped": skipped,
                },
                uids,
            )

    # ------------------------------------------------------------ livelock

    def _livelock(self, now: float) -> None:
        s = self._samples
        if len(s) < 3:
            return
        (_, o1, k1), (_, o2, k2), (_, o3, k3) = s[-3], s[-2], s[-1]
        stuck = o2 > o1 and o3 > o2 and k1 == k2 == k3
        if stuck and self.livelock_since is None:
            self.livelock_since, self.livelock_wall = now, self._wall()
            runs = self.registry.active()
            log.error(
                "OOM livelock in %s: oom climbing (%.0f/s) while oom_kill stays at %d: only unkillable tasks are left",
                self.app_cgroup, self.oom_rate, k3,
            )  # fmt: skip
            self._record(
                "oom_livelock",
                {
                    "state": "started",
                    "cgroup": self.app_cgroup,
                    "oom": o3,
                    "oom_kill": k3,
                    "oom_per_second": self.oom_rate,
                    "runs": [r.id for r in runs],
                },
                [r.uid for r in runs],
            )
        elif not stuck and self.livelock_since is not None and (o3 == o2 or k3 != k2):
            lasted = now - self.livelock_since
            self.livelock_since = self.livelock_wall = None
            log.warning("OOM livelock in %s over after %s", self.app_cgroup, fmt_duration(lasted))
            self._record(
                "oom_livelock",
                {"state": "ended", "cgroup": self.app_cgroup, "duration": round(lasted, 3)},
                (),
            )

    # ------------------------------------------------------------ status

    def _publish(self) -> None:
        try:
            self._hooks.set_oom_kill_rate(self.kill_rate)
            self._hooks.set_healer_livelock(self.app_cgroup or "", self.livelock_active)
        except Exception:  # noqa: BLE001 - a broken metric must not stop the guard
            log.exception("storm guard hooks failed")

    @property
    def livelock_active(self) -> bool:
        return self.livelock_since is not None

    def status(self) -> dict:
        """The ``livelock`` and ``storm`` parts of the healer's status."""
        return {
            "livelock": {
                "active": self.livelock_active,
                "since": self.livelock_wall,
                "oom_per_second": round(self.oom_rate, 1),
            },
            "storm": {
                "active": self.storm_active,
                "kills_per_second": round(self.kill_rate, 1),
                "threshold": self.cfg.storm_kills_per_second,
            },
        }
