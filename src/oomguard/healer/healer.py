"""The auto-healer: watch the shop, honour the grace window, bring it back.

One ``Healer`` per daemon ties the parts together. Its ``tick(now)`` is a
short, non-blocking step (the daemon calls it from ``run(stop)`` a few times
a second; tests call it with a fake clock):

1. collect health probes (health.HealthMonitor: hung endpoints are
   abandoned, never awaited);
2. keep the downtime clock (grace.Incident): an *incident* starts at the
   first failing probe of a down period and ends at the first probe after
   which every check is healthy. It is persisted atomically, on
   CLOCK_BOOTTIME together with the boot id, so it survives a daemon restart
   and ignores wall-clock jumps; wall time only picks the grace window
   (grace.choose_window);
3. once the downtime reaches the grace: end every protected run (kill.Kill:
   SIGTERM, ``term_timeout``, SIGKILL, confirm they are gone); then restart
   the configured services with a doubling back-off (grace.backoff_delays)
   until the checks pass or the tries run out;
4. watch the app cgroup's memory.events (storm.StormWatch): an OOM-kill
   storm makes it kill the policy's non-essential processes; a climbing
   ``oom`` with a flat ``oom_kill`` is reported at once as a livelock (only
   unkillable tasks are left), while the grace still decides when the
   healer acts.

Every signal obeys the never-kill rules of kill.Killer (root, the database,
oomguard itself, policy exemptions), re-checked right before it is sent.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Protocol
from zoneinfo import ZoneInfo

from oomguard.config import Config, HealerConfig, login_uid_range
from oomguard.healer import commands, health
from oomguard.healer.grace import Clock, Incident, backoff_delays, choose_window
from oomguard.healer.grace import fmt_duration as _fmt_duration
from oomguard.healer.kill import KILLED_BY_HEALER, Handle, Kill, Killer, is_database, tell_tty
from oomguard.healer.storm import StormWatch
from oomguard.host import procfs
from oomguard.host import statefile as state
from oomguard.runs.registry import Run, RunRegistry

# The healer's API, including what now lives in grace.py and kill.py.
__all__ = [
    "KILLED_BY_HEALER",
    "Clock",
    "Healer",
    "Incident",
    "Monitor",
    "backoff_delays",
    "choose_window",
    "is_database",
    "tell_tty",
]

log = logging.getLogger(__name__)

EmitFn = Callable[[str, dict, list[int]], None]
MetricFn = Callable[[str, float, dict[str, str]], None]


class Monitor(Protocol):
    """What the healer needs of health.HealthMonitor."""

    def poll(self, now: float) -> list[health.Observation]: ...
    def probe_soon(self) -> None: ...
    def close(self) -> None: ...
    def down(self) -> bool: ...
    def down_checks(self) -> list[str]: ...
    def down_since(self) -> float | None: ...
    def healthy(self) -> bool: ...
    def status(self) -> dict[str, dict]: ...


_BUSY = ("terminating", "killing", "restarting")  # phases that must run to their end


# ---------------------------------------------------------------- the healer


class Healer:
    """See the module docstring. Everything the daemon wires is injected:

    ``emit(kind, data, uids)`` stores an event ("healer", "storm",
    "oom_livelock"); ``metric(name, value, labels)`` sets a gauge;
    ``is_exempt(proc)`` is the policy's healer exemption;
    ``nonessential_pids()`` names the policy's non-essential app processes.
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
        metric: MetricFn | None = None,
        clock: Clock | None = None,
        boot_id: str | None = None,
        monitor: Monitor | None = None,
        app_cgroup: str | None = None,
        processes: Callable[[], Iterable[procfs.Proc]] = procfs.iter_processes,
        run_command: Callable[..., commands.CommandResult] = commands.run_command,
        background: bool = True,
        tick_interval: float = 0.5,
        kill_timeout: float = 10.0,
        restart_timeout: float = 120.0,
    ):
        self.config = config
        self.cfg: HealerConfig = config.healer
        self.registry = registry
        self.state_path = Path(state_path)
        self._emit_fn = emit
        self.nonessential_pids = nonessential_pids
        self._metric_fn = metric
        self.clock = clock or Clock()
        self.boot_id = boot_id or procfs.boot_id()
        self.monitor: Monitor = (
            monitor if monitor is not None else health.HealthMonitor(self.cfg.checks)
        )
        self.app_cgroup = app_cgroup if app_cgroup is not None else "/" + config.layout.app_cgroup
        self.processes = processes
        self.run_command = run_command
        self.background = background
        self.tick_interval = tick_interval
        self.kill_timeout = kill_timeout
        self.restart_timeout = restart_timeout
        self.uid_range = login_uid_range()
        self.killer = Killer(registry, self.app_cgroup, is_exempt)

        self._lock = threading.RLock()
        self.incident: Incident | None = None
        self._kills: list[Kill] = []
        self._restart_thread: threading.Thread | None = None
        self._restart_result: list[dict] | None = None
        self.last_actions: collections.deque[dict] = collections.deque(maxlen=20)
        self.storm = StormWatch(
            self.cfg,
            self.app_cgroup,
            registry,
            self.killer,
            nonessential_pids,
            record=self._record,
            metric=self._metric,
            wall=self.clock.wall,
        )
        self.ticks = 0
        self.last_tick_duration = 0.0
        self.max_tick_duration = 0.0
        self._load()

    # ------------------------------------------------------------ plumbing

    def _emit(self, kind: str, data: dict, uids: Iterable[int] = ()) -> None:
        try:
            self._emit_fn(kind, data, sorted(set(uids)))
        except Exception:  # noqa: BLE001 - a broken event store must not stop healing
            log.exception("emit(%s) failed", kind)

    def _metric(self, name: str, value: float, **labels: str) -> None:
        if self._metric_fn is None:
            return
        try:
            self._metric_fn(name, float(value), labels)
        except Exception:  # noqa: BLE001
            log.exception("metric hook %s failed", name)

    def _record(
        self, kind: str, data: dict, uids: Iterable[int] = (), dry_run: bool | None = None
    ) -> None:
        """An action or decision: kept for status() and emitted."""
        entry = {"kind": kind, "at": self.clock.wall(), **data}
        if self.cfg.dry_run if dry_run is None else dry_run:
            entry["dry_run"] = True
        with self._lock:
            self.last_actions.append(entry)
        self._emit(kind, entry, uids)

    def _decide(self, message: str, *args: object) -> None:
        """Log one decision with its reason (dry-run prefixes it)."""
        prefix = "dry-run: " if self.cfg.dry_run else ""
        log.warning(prefix + message, *args)

    def _active_uids(self) -> list[int]:
        return [r.uid for r in self.registry.active()]

    # ------------------------------------------------------------ persistence

    def _load(self) -> None:
        data = state.read_json(self.state_path, {}) or {}
        for entry in data.get("last_actions", [])[-20:]:
            if isinstance(entry, dict):
                self.last_actions.append(entry)
        raw = data.get("incident")
        if not isinstance(raw, dict):
            return
        try:
            inc = Incident(**raw)
        except TypeError:
            log.warning("ignoring an unreadable incident in %s", self.state_path)
            return
        if inc.boot_id != self.boot_id:
            log.info("incident from boot %s is void after a reboot", inc.boot_id)
            self._save()
            return
        if inc.phase in ("terminating", "killing"):
            inc.phase, inc.deadline = "waiting", None  # the grace had expired: act again
        elif inc.phase == "restarting":
            # The try's outcome is unknown: go on with the next one at once.
            inc.phase, inc.deadline = "verifying", None
        self.incident = inc
        log.warning(
            "resuming incident: down since %s (%s ago), window %s, grace %s, phase %s",
            datetime.fromtimestamp(inc.start_wall).isoformat(timespec="seconds"),
            _fmt_duration(inc.elapsed(self.clock.boottime())), inc.window, _fmt_duration(inc.grace), inc.phase,
        )  # fmt: skip

    def _save(self) -> None:
        try:
            state.write_json_atomic(
                self.state_path,
                {
                    "version": 1,
                    "incident": asdict(self.incident) if self.incident else None,
                    "last_actions": list(self.last_actions),
                },
            )
        except OSError as e:
            log.error("cannot persist healer state to %s: %s", self.state_path, e)

    # ------------------------------------------------------------ the step

    def tick(self, now: float | None = None) -> None:
        """One step; ``now`` is CLOCK_BOOTTIME seconds (a fake clock in tests)."""
        if now is None:
            now = self.clock.boottime()
        t0 = time.monotonic()
        with self._lock:
            self.monitor.poll(now)
            self.storm.watch(now)
            if self.cfg.enabled:
                self._track_incident(now)
                self._advance(now)
            self._publish(now)
            self.ticks += 1
        self.last_tick_duration = time.monotonic() - t0
        self.max_tick_duration = max(self.max_tick_duration, self.last_tick_duration)

    def run(self, stop: threading.Event) -> None:
        """The daemon thread: tick every tick_interval until ``stop`` is set."""
        log.info(
            "healer: %d checks, %d services, grace %s, timezone %s%s",
            len(self.cfg.checks), len(self.cfg.services), _fmt_duration(self.cfg.grace),
            self.cfg.timezone, " (dry run)" if self.cfg.dry_run else "",
        )  # fmt: skip
        try:
            while not stop.is_set():
                try:
                    self.tick()
                except Exception:  # noqa: BLE001 - the loop must survive a bad tick
                    log.exception("healer tick failed")
                stop.wait(self.tick_interval)
        finally:
            self.close()

    def close(self) -> None:
        """Abort running probes (their commands are killed) and close pidfds."""
        with self._lock:
            self.monitor.close()
            for k in self._kills:
                k.close()

    # ------------------------------------------------------------ the clock

    def _track_incident(self, now: float) -> None:
        inc = self.incident
        if inc is None:
            if not self.monitor.down():
                return
            start = self.monitor.down_since()
            start = now if start is None else min(start, now)
            start_wall = self.clock.wall() - (now - start)
            choice = choose_window(self.cfg, start_wall)
            inc = Incident(
                self.boot_id,
                start,
                start_wall,
                choice.name,
                choice.grace,
                self.monitor.down_checks(),
            )
            self.incident = inc
            local = datetime.fromtimestamp(start_wall, ZoneInfo(self.cfg.timezone))
            self._decide(
                "shop down: checks %s failing since %s (first failing probe); window %s, grace %s",
                ",".join(inc.checks), local.isoformat(timespec="seconds"), inc.window, _fmt_duration(inc.grace),
            )  # fmt: skip
            self._save()  # before the event: a crash in between must not start a second incident
            self._record(
                "healer",
                {
                    "action": "down",
                    "checks": inc.checks,
                    "since": start_wall,
                    "window": inc.window,
                    "grace": inc.grace,
                },
                self._active_uids(),
            )
            return
        if inc.recovered is None and self.monitor.healthy():
            inc.recovered = now
            downtime = inc.elapsed(now)
            log.warning("shop healthy again after %s of downtime", _fmt_duration(downtime))
            self._record(
                "healer",
                {
                    "action": "recovered",
                    "downtime": round(downtime, 3),
                    "window": inc.window,
                    "grace": inc.grace,
                    "acted": inc.phase != "waiting",
                    "restart_tries": inc.tries,
                    "killed_runs": inc.killed,
                },
            )
            self._save()
        if inc.recovered is not None and inc.phase not in _BUSY:
            self.incident = None
            self._save()

    # ------------------------------------------------------------ the action

    def _advance(self, now: float) -> None:
        inc = self.incident
        if inc is None:
            return
        if inc.phase == "waiting":
            if inc.recovered is None and now - inc.start >= inc.grace:
                self._act(now, inc)
        elif inc.phase == "terminating":
            if all(k.gone() for k in self._kills) or now >= (inc.deadline or now):
                for k in self._kills:
                    if not k.gone():
                        self._decide("%s: still there after SIGTERM; SIGKILL", k.label)
                        k.kill()
                inc.phase, inc.deadline = "killing", now + self.kill_timeout
                self._save()
        elif inc.phase == "killing":
            if all(k.gone() for k in self._kills) or now >= (inc.deadline or now):
                self._finish_kills(now, inc)
                self._after_kills(now, inc)
        elif inc.phase == "restarting":
            self._collect_restart(now, inc)
        elif inc.phase == "verifying":
            if inc.recovered is None and now >= (inc.deadline or now):
                if inc.tries < self.cfg.restart_tries:
                    self._start_restart(now, inc)
                else:
                    self._decide("services still down after %d restart tries; giving up", inc.tries)
                    self._record(
                        "healer",
                        {
                            "action": "gave_up",
                            "tries": inc.tries,
                            "checks": self.monitor.down_checks(),
                        },
                    )
                    inc.phase = "gave_up"
                    self._save()

    def _why(self, inc: Incident, now: float) -> str:
        return (
            f"the shop was down for {_fmt_duration(inc.elapsed(now))}, longer than the "
            f"{_fmt_duration(inc.grace)} grace ({inc.window} window)"
        )

    def _act(self, now: float, inc: Incident) -> None:
        why = self._why(inc, now)
        targets = self.select_targets()
        if not targets:
            self._decide("grace over (%s): no protected process runs; nothing to kill", why)
        if self.cfg.dry_run:
            for k in targets:
                self._decide("would kill %s: %s", k.label, why)
                self._record(
                    "healer",
                    {
                        "action": "would_kill",
                        "target": k.label,
                        "run": k.run.id if k.run else None,
                        "owner": k.user,
                        "reason": why,
                    },
                    [k.uid],
                )
            names = [s.name for s in self.cfg.services]
            self._decide("would restart services %s", ",".join(names) or "(none configured)")
            self._record("healer", {"action": "would_restart", "services": names, "reason": why})
            inc.phase = "dry_run"
            self._save()
            return
        self._kills = targets
        for k in targets:
            self._decide("killing %s: %s", k.label, why)
            k.term()
            self._record(
                "healer",
                {
                    "action": "term",
                    "target": k.label,
                    "run": k.run.id if k.run else None,
                    "owner": k.user,
                    "pids": sorted(h.pid for h in k.handles.values()),
                    "reason": why,
                },
                [k.uid],
            )
        if targets:
            inc.phase, inc.deadline = "terminating", now + self.cfg.term_timeout
            self._save()
        else:
            self._after_kills(now, inc)

    def _finish_kills(self, now: float, inc: Incident) -> None:
        why = self._why(inc, now)
        for k in self._kills:
            rec = k.finish(why)
            if rec["action"] == "killed" and k.run is not None:
                inc.killed.append(k.run.id)
            level = logging.ERROR if rec["action"] == "kill_failed" else logging.WARNING
            log.log(
                level, "%s: %s via %s; left: %s; spared: %s",
                k.label, rec["action"], rec["method"], rec.get("left", []), rec["skipped"],
            )  # fmt: skip
            self._record("healer", rec, [k.uid])
        self._kills = []

    def _after_kills(self, now: float, inc: Incident) -> None:
        if inc.recovered is not None:
            inc.phase = "idle"  # healthy again meanwhile: no restart needed
            self._save()
            return
        if not self.cfg.services:
            self._decide("no services configured to restart; waiting for the checks")
            inc.phase, inc.deadline = "idle", None
            self._save()
            return
        self._start_restart(now, inc)

    def _start_restart(self, now: float, inc: Incident) -> None:
        inc.tries += 1
        inc.phase = "restarting"
        self._save()
        self._decide(
            "restarting %s (try %d of %d)",
            ",".join(s.name for s in self.cfg.services),
            inc.tries,
            self.cfg.restart_tries,
        )
        self._restart_result = None
        if self.background:
            self._restart_thread = threading.Thread(
                target=self._restart_services, name="healer-restart", daemon=True
            )
            self._restart_thread.start()
        else:
            self._restart_services()
            self._collect_restart(now, inc)

    def _restart_services(self) -> None:
        results = []
        for svc in self.cfg.services:
            # kill_group=False: the service the command starts may share its
            # process group and must survive a slow restart command.
            r = self.run_command(
                list(svc.restart), self.restart_timeout, oom_score_adj=0, kill_group=False
            )
            results.append(
                {
                    "service": svc.name,
                    "ok": r.ok,
                    "returncode": r.returncode,
                    "timed_out": r.timed_out,
                    "output": r.output[:300],
                }
            )
        self._restart_result = results

    def _collect_restart(self, now: float, inc: Incident) -> None:
        results = self._restart_result
        if results is None:
            return
        self._restart_result = None
        self._restart_thread = None
        delay = backoff_delays(self.cfg)[inc.tries - 1]
        for r in results:
            if not r["ok"]:
                log.error("restart of %s failed: %s", r["service"], r["output"] or r["returncode"])
        self._record(
            "healer",
            {
                "action": "restart",
                "try": inc.tries,
                "tries": self.cfg.restart_tries,
                "services": results,
                "verify_for": delay,
            },
        )
        self.monitor.probe_soon()
        inc.phase, inc.deadline = "verifying", now + delay
        self._save()

    # ------------------------------------------------------------ targets

    @property
    def is_exempt(self) -> Callable[[procfs.Proc], bool]:
        """The policy's healer exemption, as given to the constructor."""
        return self.killer.is_exempt

    def refusal(self, proc: procfs.Proc, uids: Sequence[int] | None = None) -> str | None:
        """Why ``proc`` must not be signalled, or None if it may be."""
        return self.killer.refusal(proc, uids)

    def pin(
        self, pid: int, expect_start: int | None, require_protected: bool = False
    ) -> tuple[Handle | None, str | None]:
        """A pidfd on ``pid`` if it is the process we mean and may be signalled."""
        return self.killer.pin(pid, expect_start, require_protected)

    def recheck(self, h: Handle) -> str | None:
        """Right before a signal: the same process, and still one we may signal."""
        return self.killer.recheck(h)

    def select_targets(self) -> list[Kill]:
        """Every active run with live processes, plus protected (-1000)
        processes of login users that belong to no run, grouped by owner."""
        return self.killer.select_targets(self.processes, self.uid_range)

    def kill_run(
        self,
        run: Run | int,
        reason: str = KILLED_BY_HEALER,
        why: str = "stopped by an administrator",
    ) -> dict:
        """End one run as the healer does (SIGTERM, term_timeout, SIGKILL of
        its own cgroup or its pidfds, confirm) and return the record. Blocks
        for at most term_timeout + kill_timeout. For `oomguard kill-run ID`:
        an explicit command, so it acts even in dry-run mode."""
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
        rec = k.at_once(self.cfg.term_timeout, self.kill_timeout, why)
        log.warning("%s: %s via %s (%s)", k.label, rec["action"], rec["method"], why)
        self._record("healer", rec, [run.uid], dry_run=False)
        return rec

    # ------------------------------------------------------------ storm guard, livelock (storm.py)

    @property
    def kill_rate(self) -> float:
        return self.storm.kill_rate

    @property
    def oom_rate(self) -> float:
        return self.storm.oom_rate

    @property
    def storm_active(self) -> bool:
        return self.storm.storm_active

    @property
    def livelock_since(self) -> float | None:
        return self.storm.livelock_since

    @property
    def livelock_wall(self) -> float | None:
        return self.storm.livelock_wall

    # ------------------------------------------------------------ status

    def _publish(self, now: float) -> None:
        if self._metric_fn is None:
            return
        inc = self.incident
        down = inc is not None and inc.recovered is None
        self._metric("oomguard_healer_down", 1 if down else 0)
        self._metric("oomguard_healer_downtime_seconds", inc.elapsed(now) if down and inc else 0)
        self._metric("oomguard_healer_oom_kills_per_second", self.storm.kill_rate)
        self._metric(
            "oomguard_healer_livelock",
            1 if self.storm.livelock_active else 0,
            cgroup=self.app_cgroup,
        )
        self._metric("oomguard_healer_tick_seconds", self.last_tick_duration)

    def window_status(self, now: float | None = None) -> dict:
        """The window that governs (the incident's, else the one in force now)
        and the time left before the healer acts (None when not down)."""
        now = self.clock.boottime() if now is None else now
        with self._lock:
            inc = self.incident
            if inc is None or inc.recovered is not None:
                choice = choose_window(self.cfg, self.clock.wall())
                return {
                    "window": choice.name,
                    "grace": choice.grace,
                    "down": False,
                    "time_left": None,
                }
            elapsed = inc.elapsed(now)
            left = max(0.0, inc.grace - elapsed) if inc.phase == "waiting" else 0.0
            return {
                "window": inc.window,
                "grace": inc.grace,
                "down": True,
                "downtime": elapsed,
                "time_left": left,
                "acts_at": self.clock.wall() + left if inc.phase == "waiting" else None,
            }

    def status(self, now: float | None = None) -> dict:
        """Everything `oomguard status` shows about the healer (JSON-safe)."""
        now = self.clock.boottime() if now is None else now
        with self._lock:
            inc = self.incident
            out = {
                "enabled": self.cfg.enabled,
                "dry_run": self.cfg.dry_run,
                "permissive": self.cfg.permissive,
                "timezone": self.cfg.timezone,
                "phase": inc.phase if inc else "watching",
                "checks": self.monitor.status(),
                "down_since": inc.start_wall if inc and inc.recovered is None else None,
                "restart_tries": inc.tries if inc else 0,
                "killed_runs": list(inc.killed) if inc else [],
                **self.window_status(now),
                **self.storm.status(),  # "livelock", "storm"
                "loop": {
                    "ticks": self.ticks,
                    "interval": self.tick_interval,
                    "last_tick_seconds": self.last_tick_duration,
                    "max_tick_seconds": self.max_tick_duration,
                },
                "last_actions": list(self.last_actions),
            }
        return out
