"""The auto-healer: watch the shop, honour the grace window, bring it back.

One ``Healer`` per daemon. Its ``tick(now)`` is a short, non-blocking step
(the daemon calls it from ``run(stop)`` a few times a second; tests call it
with a fake clock):

1. collect health probes (health.HealthMonitor: hung endpoints are
   abandoned, never awaited);
2. keep the downtime clock: an *incident* starts at the first failing probe
   of a down period and ends at the first probe after which every check is
   healthy. It is persisted atomically, on CLOCK_BOOTTIME together with the
   boot id, so it survives a daemon restart and ignores wall-clock jumps;
   wall time only picks the grace window (by the local time the outage
   began, in the configured zoneinfo timezone);
3. once the downtime reaches the grace: SIGTERM every protected run, wait
   ``term_timeout``, SIGKILL each run's *own* cgroup (cgroup.kill) or, for a
   run without one, each process through a pidfd; confirm they are gone;
   then restart the configured services with a doubling back-off until the
   checks pass or the tries run out;
4. watch the app cgroup's memory.events: an OOM-kill storm makes it kill
   the policy's non-essential processes; a climbing ``oom`` with a flat
   ``oom_kill`` is reported at once as a livelock (only unkillable tasks
   are left), while the grace still decides when the healer acts.

Never signalled, re-checked right before every signal: root's processes
(any of real/effective/saved uid 0), the database, oomguard itself, and
whatever the injected policy test ``is_exempt(proc)`` exempts.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import select
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from datetime import time as dtime
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from . import cgroups, health, procfs, state
from .config import Config, HealerConfig, Window, login_uid_range
from .runs import Run, RunRegistry

log = logging.getLogger("oomguard.healer")

OOM_SCORE_ADJ_MIN = -1000
KILLED_BY_HEALER = "killed by healer"
# The database's server binaries, matched on the *executable path* (a user
# cannot put files in these directories; comm alone could be forged).
DB_BINARIES = frozenset({"mariadbd", "mysqld", "mariadbd-safe", "mysqld_safe"})
SYSTEM_DIRS = ("/usr/", "/bin/", "/sbin/", "/lib/", "/lib64/", "/opt/")
TTY_PATH = re.compile(r"/dev/(pts/\d+|tty\d+|ttyS\d+)")

EmitFn = Callable[[str, dict, list[int]], None]
MetricFn = Callable[[str, float, dict[str, str]], None]


class Clock:
    """CLOCK_BOOTTIME for elapsed time (it keeps counting through suspend and
    never jumps), wall time only for choosing windows and for people."""

    def boottime(self) -> float:
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def wall(self) -> float:
        return time.time()


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


# ---------------------------------------------------------------- windows


@dataclass(frozen=True)
class WindowChoice:
    name: str  # "default" or "23:00-07:00"
    grace: float


def window_name(w: Window) -> str:
    return f"{w.start:%H:%M}-{w.end:%H:%M}"


def in_window(w: Window, t: dtime) -> bool:
    """Whether local time-of-day ``t`` is in [start, end); wraps midnight."""
    t = t.replace(second=0, microsecond=0, tzinfo=None)
    if w.start < w.end:
        return w.start <= t < w.end
    return t >= w.start or t < w.end


def choose_window(cfg: HealerConfig, wall: float) -> WindowChoice:
    """The window in force at wall-clock time ``wall`` (epoch seconds), read in
    the configured timezone; zoneinfo maps the instant to local time, so DST
    changes are handled by the tz database, not by us."""
    local = datetime.fromtimestamp(wall, ZoneInfo(cfg.timezone))
    for w in cfg.windows:
        if in_window(w, local.time()):
            return WindowChoice(window_name(w), w.grace)
    return WindowChoice("default", cfg.grace)


def backoff_delays(cfg: HealerConfig) -> list[float]:
    """The wait after each restart try: restart_backoff doubling, capped at
    restart_backoff_max; one entry per try."""
    return [
        min(cfg.restart_backoff * 2**i, cfg.restart_backoff_max) for i in range(cfg.restart_tries)
    ]


# ---------------------------------------------------------------- helpers


def is_database(proc: procfs.Proc) -> bool:
    exe = (proc.exe or "").removesuffix(" (deleted)")
    return os.path.basename(exe) in DB_BINARIES and exe.startswith(SYSTEM_DIRS)


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


def _pidfd_exited(fd: int) -> bool:
    """A pidfd polls readable once its process has exited (zombies included)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


def _fmt_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass
class _Handle:
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


# ---------------------------------------------------------------- killing


class _Kill:
    """Ending one protected run (or the protected processes of one uid that
    belong to no run): term(), then kill() after the grace, then finish().
    Each step is short, so the healer's tick can drive it."""

    def __init__(
        self,
        healer: Healer,
        run: Run | None,
        uid: int,
        user: str,
        orphans: Sequence[procfs.Proc] = (),
        reason: str = KILLED_BY_HEALER,
    ):
        self.h = healer
        self.reason = reason  # the run's end_reason
        self.run = run
        self.uid = uid
        self.user = user
        self.orphans = list(orphans)
        self.handles: dict[tuple[int, int], _Handle] = {}
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
        return [(pid, procfs.starttime_of(pid)) for pid in self.h.registry.pids(self.run)]

    def _pin_new(self) -> list[_Handle]:
        fresh = []
        for pid, start in self._candidates():
            if any(h.pid == pid for h in self.handles.values()):
                continue
            handle, why = self.h.pin(pid, start, require_protected=self.run is None)
            if handle is None:
                if why not in ("gone", "zombie"):
                    self.skipped[pid] = why or "?"
                continue
            self.handles[(handle.pid, handle.starttime)] = handle
            fresh.append(handle)
        return fresh

    def term(self) -> None:
        handles = self._pin_new()
        if handles and self.run is not None and self.run.end_reason is None:
            # Recorded before the signal, so the reaper keeps our reason if it
            # sees the run end first.
            self.h.registry.update(self.run.id, end_reason=self.reason)
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
        app = cgroups.normalize(self.h.app_cgroup) if self.h.app_cgroup else None
        if cg == "/" or (app and (cg == app or app.startswith(cg + "/"))):
            return None
        for other in self.h.registry.active():
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

    def _signal(self, h: _Handle, sig: int) -> bool:
        """Signal through the pidfd after the last-moment re-check; a process
        that has become untouchable (setuid root, exempt) is left alone."""
        why = self.h.recheck(h)
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
            why = self.h.refusal(proc)
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
            if self.h.refusal(proc) is None and (
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
                # Something of it still runs: take back the reason set at SIGTERM.
                cur = self.h.registry.get(self.run.id)
                if cur is not None and cur.active and cur.end_reason == self.reason:
                    self.h.registry.update(self.run.id, end_reason=None)
            if complete and self.run.tty:
                record["told_tty"] = tell_tty(self.run.tty, self.run.uid, self._message(why))
        return record

    def _end_run(self, reason: str) -> None:
        run = self.h.registry.get(self.run.id) if self.run else None
        if run is None:
            return
        peak = None
        own = self.own_cgroup()  # never rmdir a shared cgroup
        if own is not None:
            peak = cgroups.memory_peak(own)
            try:
                cgroups.remove(own)
            except OSError as e:
                log.warning("run %d: cannot remove cgroup %s: %s", run.id, own, e)
        # The end itself is the reaper's to record (with the run_end event it
        # emits); the reason set here is what it will record.
        changes: dict[str, Any] = {"end_reason": reason}
        if peak is not None:
            changes["peak_memory"] = peak
        self.h.registry.update(run.id, **changes)

    def _message(self, why: str) -> str:
        run = self.run
        assert run is not None
        return f"oomguard: protected run {run.id} ({run.command[:60]}) was stopped: {why}"


# ---------------------------------------------------------------- the incident


@dataclass
class Incident:
    """One down period, persisted. Times are CLOCK_BOOTTIME seconds of the
    boot named by boot_id; start_wall only chose the window."""

    boot_id: str
    start: float
    start_wall: float
    window: str
    grace: float
    checks: list[str] = field(default_factory=list)
    phase: str = "waiting"  # waiting terminating killing restarting verifying gave_up dry_run idle
    tries: int = 0
    deadline: float | None = None
    recovered: float | None = None
    killed: list[int] = field(default_factory=list)

    def elapsed(self, now: float) -> float:
        end = self.recovered if self.recovered is not None else now
        return max(0.0, end - self.start)


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
        run_command: Callable[..., health.CommandResult] = health.run_command,
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
        self.is_exempt = is_exempt
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

        self._lock = threading.RLock()
        self.incident: Incident | None = None
        self._kills: list[_Kill] = []
        self._restart_thread: threading.Thread | None = None
        self._restart_result: list[dict] | None = None
        self.last_actions: collections.deque[dict] = collections.deque(maxlen=20)
        # storm guard / livelock
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque()
        self.kill_rate = 0.0
        self.oom_rate = 0.0
        self.storm_active = False
        self._storm_next = 0.0
        self.livelock_since: float | None = None
        self.livelock_wall: float | None = None
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
            self._watch_cgroup(now)
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
                for h in k.handles.values():
                    h.close()

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
    ) -> tuple[_Handle | None, str | None]:
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
        return _Handle(pid, proc.starttime, fd, proc.comm, proc.uid, proc.state), None

    def recheck(self, h: _Handle) -> str | None:
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

    def select_targets(self) -> list[_Kill]:
        """Every active run with live processes, plus protected (-1000)
        processes of login users that belong to no run, grouped by owner."""
        targets: list[_Kill] = []
        for run in self.registry.active():
            if self.registry.pids(run):
                targets.append(_Kill(self, run, run.uid, run.user))
        lo, hi = self.uid_range
        orphans: dict[int, list[procfs.Proc]] = collections.defaultdict(list)
        for proc in self.processes():
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
            targets.append(_Kill(self, None, uid, _user_name(uid), procs))
        return targets

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
        k = _Kill(self, run, run.uid, run.user, reason=reason)
        k.term()
        deadline = time.monotonic() + self.cfg.term_timeout
        while not k.gone() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not k.gone():
            k.kill()
            deadline = time.monotonic() + self.kill_timeout
            while not k.gone() and time.monotonic() < deadline:
                time.sleep(0.02)
        rec = k.finish(why)
        log.warning("%s: %s via %s (%s)", k.label, rec["action"], rec["method"], why)
        self._record("healer", rec, [run.uid], dry_run=False)
        return rec

    # ------------------------------------------------------------ storm guard, livelock

    def _watch_cgroup(self, now: float) -> None:
        if not self.app_cgroup:
            return
        ev = cgroups.memory_events(self.app_cgroup)
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
            if self.cfg.dry_run:
                why = self.refusal(proc)
                if why:
                    skipped[str(pid)] = why
                else:
                    killed.append({"pid": pid, "comm": proc.comm, "uid": proc.uid})
                    uids.add(proc.uid)
                continue
            handle, why = self.pin(pid, proc.starttime)
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

    def _livelock(self, now: float) -> None:
        s = self._samples
        if len(s) < 3:
            return
        (_, o1, k1), (_, o2, k2), (_, o3, k3) = s[-3], s[-2], s[-1]
        stuck = o2 > o1 and o3 > o2 and k1 == k2 == k3
        if stuck and self.livelock_since is None:
            self.livelock_since, self.livelock_wall = now, self.clock.wall()
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
            self._metric("oomguard_healer_livelock", 1, cgroup=self.app_cgroup)
        elif not stuck and self.livelock_since is not None and (o3 == o2 or k3 != k2):
            lasted = now - self.livelock_since
            self.livelock_since = self.livelock_wall = None
            log.warning("OOM livelock in %s over after %s", self.app_cgroup, _fmt_duration(lasted))
            self._record(
                "oom_livelock",
                {"state": "ended", "cgroup": self.app_cgroup, "duration": round(lasted, 3)},
            )
            self._metric("oomguard_healer_livelock", 0, cgroup=self.app_cgroup)

    # ------------------------------------------------------------ status

    def _publish(self, now: float) -> None:
        if self._metric_fn is None:
            return
        inc = self.incident
        down = inc is not None and inc.recovered is None
        self._metric("oomguard_healer_down", 1 if down else 0)
        self._metric("oomguard_healer_downtime_seconds", inc.elapsed(now) if down and inc else 0)
        self._metric("oomguard_healer_oom_kills_per_second", self.kill_rate)
        self._metric(
            "oomguard_healer_livelock",
            1 if self.livelock_since is not None else 0,
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
                "livelock": {
                    "active": self.livelock_since is not None,
                    "since": self.livelock_wall,
                    "oom_per_second": round(self.oom_rate, 1),
                },
                "storm": {
                    "active": self.storm_active,
                    "kills_per_second": round(self.kill_rate, 1),
                    "threshold": self.cfg.storm_kills_per_second,
                },
                "loop": {
                    "ticks": self.ticks,
                    "interval": self.tick_interval,
                    "last_tick_seconds": self.last_tick_duration,
                    "max_tick_seconds": self.max_tick_duration,
                },
                "last_actions": list(self.last_actions),
            }
        return out


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
