"""The auto-healer: watch the shop, honour the grace window, bring it back.

One ``Healer`` per daemon ties the parts together. Its ``tick(now)`` is a
short, non-blocking step (the daemon calls it from ``run(stop)`` a few times
a second; tests call it with a fake clock):

1. collect health probes (health.HealthMonitor: hung endpoints are
   abandoned, never awaited);
2. keep the downtime clock (incident.Incident): an *incident* starts at the
   first failing probe of a down period and ends at the first probe after
   which every check is healthy. It is persisted atomically
   (incident.IncidentFile), on CLOCK_BOOTTIME together with the boot id, so
   it survives a daemon restart and ignores wall-clock jumps; wall time only
   picks the grace window (grace.choose_window);
3. once the downtime reaches the grace: end every protected run
   (killer.Kill: SIGTERM, ``term_timeout``, SIGKILL, confirm they are gone);
   then restart the configured services (restart.Restarter) with a doubling
   back-off (grace.backoff_delays) until the checks pass or the tries run out;
4. watch the app cgroup's memory.events (storm.StormWatch): an OOM-kill
   storm makes it kill the policy's non-essential processes; a climbing
   ``oom`` with a flat ``oom_kill`` is reported at once as a livelock (only
   unkillable tasks are left), while the grace still decides when the
   healer acts.

Every signal obeys the never-kill rules of guard.Guard (root, the database,
oomguard itself, policy exemptions), re-checked right before it is sent.
Figures go out through the typed hooks (telemetry/hooks.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from zoneinfo import ZoneInfo

from oomguard.config import Config, HealerConfig, login_uid_range
from oomguard.healer import commands, health
from oomguard.healer.actions import ActionLog, EmitFn, decide
from oomguard.healer.grace import Clock, choose_window, fmt_duration
from oomguard.healer.guard import Guard
from oomguard.healer.incident import BUSY, Incident, IncidentFile, Phase
from oomguard.healer.killer import KILLED_BY_HEALER, Kill, Killer
from oomguard.healer.response import Response
from oomguard.healer.restart import Restarter
from oomguard.healer.storm import StormWatch
from oomguard.healer.warnings import RunWarnings
from oomguard.host import procfs, users
from oomguard.runs.registry import RunRegistry
from oomguard.runs.run import Run
from oomguard.telemetry.hooks import NO_HOOKS, Hooks

log = logging.getLogger(__name__)

FAST_TICK = 0.5  # seconds between ticks while something is happening
CALM_TICK = 5.0  # the longest wait between ticks when all is well (the watchdog wants a tick per minute)
STORM_SAMPLE = 1.0  # calm, but an app cgroup to watch: a storm is seen within about a second


class Healer:
    """See the module docstring. Everything the daemon wires is injected:

    ``emit(kind, data, uids)`` stores an event ("healer", "storm",
    "oom_livelock"); ``hooks`` receives the figures; ``is_exempt(proc)`` is
    the policy's healer exemption; ``nonessential_pids()`` names the
    policy's non-essential app processes.
    """

    def __init__(
        self,
        config: Config,
        registry: RunRegistry,
        state_path: str | os.PathLike[str],
        emit: EmitFn,
        *,
        is_exempt: Callable[[procfs.Proc], bool] = lambda proc: False,
        nonessential_pids: Callable[[], list[int]] = lambda: [],
        permissive_for: Callable[[int], bool] = lambda uid: False,
        hooks: Hooks = NO_HOOKS,
        clock: Clock | None = None,
        boot_id: str | None = None,
        monitor: health.Monitor | None = None,
        app_cgroup: str | None = None,
        processes: Callable[[], Iterable[procfs.Proc]] = procfs.iter_processes,
        run_command: Callable[..., commands.CommandResult] = commands.run_command,
        background: bool = True,
        tick_interval: float = FAST_TICK,
        calm_interval: float = CALM_TICK,
        kill_timeout: float = 10.0,
        restart_timeout: float = 120.0,
    ):
        self.cfg: HealerConfig = config.healer
        self.registry = registry
        self.hooks = hooks
        self.clock = clock or Clock()
        self.boot_id = boot_id or procfs.boot_id()
        self.monitor: health.Monitor = (
            monitor if monitor is not None else health.HealthMonitor(self.cfg.checks)
        )
        self.app_cgroup = app_cgroup if app_cgroup is not None else "/" + config.layout.app_cgroup
        self.processes = processes
        self.tick_interval = tick_interval
        self.calm_interval = calm_interval
        self._wake = threading.Event()  # a probe finished: collect it now
        if isinstance(self.monitor, health.HealthMonitor):
            self.monitor.on_finished = self._wake.set
        self.kill_timeout = kill_timeout
        self.uid_range = login_uid_range()
        self.protect = config.protect  # who may ask: whose loose -1000 processes are ours to end
        guard = Guard(is_exempt)
        self.killer = Killer(registry, self.app_cgroup, guard)

        self._lock = threading.RLock()
        self._file = IncidentFile(state_path, self.boot_id)
        self.incident, earlier = self._file.load()
        self.actions = ActionLog(emit, hooks, lambda: self.cfg.dry_run, self.clock.wall, earlier)
        self.response = Response(
            self.cfg, self.monitor, Restarter(self.cfg.services, run_command, restart_timeout, background),
            self.select_targets, self._record, self._save, kill_timeout,
        )  # fmt: skip
        self.storm = StormWatch(
            self.cfg, self.app_cgroup, registry, guard, nonessential_pids,
            record=self.actions.record, wall=self.clock.wall, hooks=hooks, permissive_for=permissive_for,
        )  # fmt: skip
        self.warnings = RunWarnings(self.cfg, registry.active, self.actions.record, self.clock.wall)
        self.ticks = 0
        self.last_tick_duration = 0.0
        self.max_tick_duration = 0.0
        if self.incident is not None:
            inc = self.incident
            log.warning(
                "resuming incident: down since %s (%s ago), window %s, grace %s, phase %s",
                datetime.fromtimestamp(inc.start_wall).isoformat(timespec="seconds"),
                fmt_duration(inc.elapsed(self.clock.boottime())), inc.window, fmt_duration(inc.grace), inc.phase,
            )  # fmt: skip

    # ------------------------------------------------------------ plumbing

    def _record(self, data: dict, uids: Iterable[int] = (), dry_run: bool | None = None) -> None:
        self.actions.record("healer", data, uids, dry_run)

    def _save(self) -> None:
        self._file.save(self.incident, self.actions.last())

    # ------------------------------------------------------------ the step

    def tick(self, now: float | None = None) -> None:
        """One step; ``now`` is CLOCK_BOOTTIME seconds (a fake clock in tests)."""
        t0 = time.monotonic()
        with self._lock:
            if now is None:  # read under the lock: a wait for it must not age the tick's clock
                now = self.clock.boottime()
            self.monitor.poll(now)
            self.storm.watch(now)
            if self.cfg.enabled:
                self._track_incident(now)
                self.warnings.update(now, self.incident)
                if self.incident is not None:
                    self.response.advance(now, self.incident)
            self._publish(now)
            self.ticks += 1
        self.last_tick_duration = time.monotonic() - t0
        self.max_tick_duration = max(self.max_tick_duration, self.last_tick_duration)

    def run(self, stop: threading.Event) -> None:
        """The daemon thread: tick every tick_interval until ``stop`` is set."""
        log.info(
            "healer: %d checks, %d services, grace %s, timezone %s%s",
            len(self.cfg.checks), len(self.cfg.services), fmt_duration(self.cfg.grace),
            self.cfg.timezone, " (dry run)" if self.cfg.dry_run else "",
        )  # fmt: skip
        try:
            while not stop.is_set():
                self._wake.clear()
                delay = self.tick_interval
                try:
                    self.tick()
                    delay = self.next_tick(self.clock.boottime())
                except Exception:  # noqa: BLE001 - the loop must survive a bad tick
                    log.exception("healer tick failed")
                # One wait for either event: the stop wakes this wait too.
                if not stop.is_set():
                    self._wake.wait(delay)
        finally:
            self.close()

    def stop_waiting(self) -> None:
        """End the current wait between ticks at once (the daemon's stop)."""
        self._wake.set()

    def next_tick(self, now: float) -> float:
        """Seconds from ``now`` to the next tick. ``tick_interval`` during an
        incident (down, acting, verifying), while a check is failing, and
        while the app cgroup sees OOM activity (a storm, a livelock, a kill
        or oom counted in its last seconds); otherwise the wait until the
        next probe is due, at most ``calm_interval`` (STORM_SAMPLE while
        the app cgroup's memory.events can be read, so that a storm starting
        in a calm moment is seen within about a second): an idle healer
        wakes once a second or less, not twice a second."""
        with self._lock:
            storm = self.storm
            busy = (
                (self.cfg.enabled and self.incident is not None)
                or storm.storm_active or storm.livelock_active or storm.kill_rate > 0 or storm.oom_rate > 0
            )  # fmt: skip
            calm_until = getattr(self.monitor, "calm_until", None)
            until = calm_until() if calm_until is not None else None  # a scripted monitor: keep close watch
        if busy or until is None:
            return self.tick_interval
        longest = min(self.calm_interval, STORM_SAMPLE) if storm.watching else self.calm_interval
        return min(longest, max(self.tick_interval / 10, until - now))

    def close(self) -> None:
        """Abort running probes (their commands are killed) and close pidfds."""
        with self._lock:
            self.monitor.close()
            self.response.close()

    def _publish(self, now: float) -> None:
        inc = self.incident
        down = inc is not None and inc.down
        try:
            self.hooks.set_healer_down(down)
            self.hooks.set_downtime(inc.elapsed(now) if down and inc else 0.0)
            self.hooks.set_tick_seconds(self.last_tick_duration)
        except Exception:  # noqa: BLE001 - a broken metric must not stop healing
            log.exception("healer hooks failed")

    # ------------------------------------------------------------ the clock

    def _track_incident(self, now: float) -> None:
        inc = self.incident
        if inc is None:
            if self.monitor.down():
                self._open_incident(now)
            return
        if inc.down and self.monitor.healthy():
            inc.recovered = now
            downtime = inc.elapsed(now)
            log.warning("shop healthy again after %s of downtime", fmt_duration(downtime))
            self._record(
                {
                    "action": "recovered",
                    "downtime": round(downtime, 3),
                    "window": inc.window,
                    "grace": inc.grace,
                    "acted": inc.phase != Phase.WAITING,
                    "restart_tries": inc.tries,
                    "killed_runs": inc.killed,
                },
            )
            self.warnings.recovered(inc)
            self._save()
        if not inc.down and inc.phase not in BUSY:
            self.incident = None
            self._save()

    def _open_incident(self, now: float) -> None:
        start = self.monitor.down_since()
        start = now if start is None else min(start, now)
        start_wall = self.clock.wall() - (now - start)
        choice = choose_window(self.cfg, start_wall)
        inc = Incident(
            self.boot_id, start, start_wall, choice.name, choice.grace, self.monitor.down_checks()
        )
        self.incident = inc
        local = datetime.fromtimestamp(start_wall, ZoneInfo(self.cfg.timezone))
        decide(
            log, self.cfg.dry_run, "shop down: checks %s failing since %s (first failing probe); window %s, grace %s",
            ",".join(inc.checks), local.isoformat(timespec="seconds"), inc.window, fmt_duration(inc.grace),
        )  # fmt: skip
        self._save()  # before the event: a crash in between must not start a second incident
        self._record(
            {
                "action": "down",
                "checks": inc.checks,
                "since": start_wall,
                "window": inc.window,
                "grace": inc.grace,
            },
            [r.uid for r in self.registry.active()],
        )

    # ------------------------------------------------------------ targets

    def select_targets(self) -> list[Kill]:
        """Every active run with live processes, plus protected (-1000)
        processes of login users that belong to no run, grouped by owner."""
        return self.killer.select_targets(self.processes, self.sweepable)

    def sweepable(self, uid: int) -> bool:
        """Whether a -1000 process of ``uid`` outside any run is the healer's
        to end: a login user's, or one [protect] lets ask (a system account
        such as www-data included)."""
        lo, hi = self.uid_range
        if lo <= uid <= hi or (self.protect.allow_uids is not None and uid in self.protect.allow_uids):
            return True
        return bool(self.protect.allow_gids and users.groups_of(uid) & self.protect.allow_gids)

    def may_end(self, proc: procfs.Proc) -> bool:
        """The sweep's rule for one loose -1000 process (and adoption's)."""
        return self.sweepable(proc.uid) and self.killer.guard.refusal(proc) is None

    def kill_run(
        self,
        run: Run | int,
        reason: str = KILLED_BY_HEALER,
        why: str = "stopped by an administrator",
        term_timeout: float | None = None,
    ) -> dict:
        """End one run as the healer does (SIGTERM, term_timeout, SIGKILL of
        its own cgroup or its pidfds, confirm) and return the record. Blocks
        for at most term_timeout (the config's unless given) + kill_timeout.
        For `oomguard kill-run ID` and a run over its budget: explicit, so
        it acts even in dry-run mode."""
        if isinstance(run, int):
            found = self.registry.get(run)
            if found is None:
                raise KeyError(f"no run {run}")
            run = found
        if not run.active:
            return {
                "action": "not_running",
                "run": run.id,
                "owner": run.user,
                "end_reason": run.end_reason,
            }
        k = Kill(self.killer, run, run.uid, run.user, reason=reason)
        rec = k.at_once(self.cfg.term_timeout if term_timeout is None else term_timeout, self.kill_timeout, why)
        log.warning("%s: %s via %s (%s)", k.label, rec["action"], rec["method"], why)
        self._record(rec, [run.uid], dry_run=False)
        return rec

    # ------------------------------------------------------------ status

    def window_status(self, now: float | None = None) -> dict:
        """The window that governs (the incident's, else the one in force now)
        and the time left before the healer acts (None when not down)."""
        now = self.clock.boottime() if now is None else now
        with self._lock:
            inc = self.incident
            if inc is None or not inc.down:
                choice = choose_window(self.cfg, self.clock.wall())
                return {
                    "window": choice.name,
                    "grace": choice.grace,
                    "down": False,
                    "time_left": None,
                }
            elapsed = inc.elapsed(now)
            waiting = inc.phase == Phase.WAITING
            left = max(0.0, inc.grace - elapsed) if waiting else 0.0
            return {
                "window": inc.window,
                "grace": inc.grace,
                "down": True,
                "downtime": elapsed,
                "time_left": left,
                "acts_at": self.clock.wall() + left if waiting else None,
            }

    def status(self, now: float | None = None) -> dict:
        """Everything `oomguard status` shows about the healer (JSON-safe)."""
        now = self.clock.boottime() if now is None else now
        with self._lock:
            inc = self.incident
            return {
                "enabled": self.cfg.enabled,
                "dry_run": self.cfg.dry_run,
                "permissive": self.cfg.permissive,
                "timezone": self.cfg.timezone,
                "phase": inc.phase.value if inc else "watching",
                "checks": self.monitor.status(),
                "down_since": inc.start_wall if inc and inc.down else None,
                "restart_tries": inc.tries if inc else 0,
                "killed_runs": list(inc.killed) if inc else [],
                **self.window_status(now),
                **self.storm.status(),  # "livelock", "storm"
                "loop": {
                    "ticks": self.ticks,
                    "interval": self.tick_interval,
                    "calm_interval": self.calm_interval,
                    "last_tick_seconds": self.last_tick_duration,
                    "max_tick_seconds": self.max_tick_duration,
                },
                "last_actions": self.actions.last(),
            }
