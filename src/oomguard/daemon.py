"""`oomguard daemon`: wires the parts together and runs them in threads.

Threads, each with one concern, so that none can stall another:
  broker     the socket: grants and queries (broker.py)
  procevents fork/exec/exit from the kernel (policy, run exits), or polling
  reaper     ends runs whose cgroups emptied, samples gauges
  oomwatch   kernel OOM reports from /dev/kmsg, attributed to runs
  healer     health checks, grace windows, kills and restarts
  budget-run-N  ends one run livelocked at its --memory-max (healer/budget.py)
  metrics    the Prometheus exporter (prometheus-client's own thread)
  textfile   the same metrics for node_exporter, rewritten periodically
The daemon keeps itself at oom_score_adj -1000; what it starts begins at 0.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oomguard import config
from oomguard.broker import Broker, Granter, Peer
from oomguard.forensics import events, oomwatch, runreport, status
from oomguard.forensics.eventreader import EventReader
from oomguard.forensics.eventwriter import EventWriter
from oomguard.healer import healer
from oomguard.healer.budget import BudgetWatch
from oomguard.healer.tty import tell_tty
from oomguard.host import cgroups, journal, procevents, procfs, statefile
from oomguard.host.sdnotify import Notifier as SystemdNotifier
from oomguard.host.wakeup import StopEvent
from oomguard.notify.dispatch import Notifier
from oomguard.policy import rules as policy
from oomguard.policy.enforcer import Enforcer
from oomguard.prefs.settings import UserSettings
from oomguard.runs.adoption import Adoption
from oomguard.runs.lifecycle import RunLifecycle, owns_cgroup
from oomguard.runs.registry import RunRegistry
from oomguard.runs.run import Run
from oomguard.runs.views import run_view
from oomguard.socketops import SocketOps
from oomguard.telemetry.hooks import Unexported
from oomguard.telemetry.liveness import Liveness, TickWatch
from oomguard.telemetry.reasons import RefusalReason

if TYPE_CHECKING:
    from oomguard.forensics import metrics

log = logging.getLogger(__name__)
events_log = logging.getLogger("oomguard.events")  # one line per stored event

READY_WAIT = 60.0  # the first policy pass over a very busy box
REAP_EVERY = 0.5  # seconds between reaper passes while runs exist
REAP_IDLE = 60.0  # with none: forgetting old ended runs can wait


def setup_logging(level: str) -> None:
    """journald's native protocol (MESSAGE_ID and OOMGUARD_* fields per event)
    when systemd connected stderr to the journal; otherwise stderr, one line
    per record with a syslog priority prefix (<3> error ... <7> debug).
    A daemon run by hand logs where it was started, journal socket or not."""
    if journal.stream_is_journal(os.environ, 2):
        handler = journal.make_handler()
    else:
        prio = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}

        class PriorityFormatter(logging.Formatter):
            def format(self, record: logging.LogRecord) -> str:
                text = super().format(record).replace("\n", " | ")
                return f"<{prio.get(record.levelname, 6)}>{record.name}: {text}"

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(PriorityFormatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def event_summary(kind: str, data: dict) -> str:
    """A short line for the log; the journal has every field besides."""
    keys = ("id", "run", "user", "uid", "pid", "action", "reason", "victim_pid", "victim_comm", "exit_status")
    parts = [f"{k}={data[k]}" for k in keys if data.get(k) is not None]
    return f"event {kind}: {' '.join(parts)}"[:500]


class Daemon:
    def __init__(self, cfg: config.Config, config_path: str | None = None):
        self.cfg = cfg
        self.config_path = config_path
        self.stop = StopEvent()  # loops that block on fds wake on it too
        state_dir = Path(cfg.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        for name in statefile.remove_stale_temps(state_dir):  # a write cut short by SIGKILL
            log.info("removed %s, left by a daemon killed while writing", state_dir / name)
        # Deferred: the reaper writes runs.json, so no fork or end waits on the disk.
        self.registry = RunRegistry(state_dir / "runs.json", deferred=True)
        self.lifecycle = RunLifecycle(self.registry)
        self.store = events.EventStore(cfg.events.db, cfg.events.max_age, cfg.events.max_rows)
        self.notifier = Notifier(cfg.notify)
        self.store.on_added = self.on_stored
        self.event_reader = EventReader(cfg.events.db)  # started on the first events query
        # Events from threads that serve users are written off their thread.
        self.writer = EventWriter(self.store)
        self.failed = False  # a thread died: exit non-zero so systemd restarts us
        self.systemd = SystemdNotifier()
        self.liveness = Liveness(self.systemd, watch_ticks=cfg.healer.enabled)
        self.policy_applied = threading.Event()  # READY=1 waits for it
        self.metrics: metrics.Metrics | Unexported = Unexported()
        if cfg.metrics.listen or cfg.metrics.textfile:
            from oomguard.forensics import metrics  # prometheus_client: only when something exports

            self.metrics = metrics.Metrics(cfg.metrics.top_comms)
        self.settings = UserSettings(state_dir / "settings.json", frozenset(cfg.protect.user_settings))
        self.textfile = metrics.TextfileWriter.attach(self.metrics, cfg.metrics) if cfg.metrics.textfile else None  # type: ignore[arg-type]
        self.granter = Granter(cfg.protect, self.registry, self.on_grant, self.on_refusal)
        self.ops = SocketOps(self)
        self.broker = Broker(cfg, self.granter, self.ops.handlers())  # queries run in its pool
        self.enforcer = Enforcer.from_config(cfg, self.registry, on_change=self.on_policy_change)
        self.app_cgroup = cgroups.app_group(cfg.layout.app_slice, cfg.layout.app_cgroup)
        self.healer = healer.Healer(
            cfg,
            self.registry,
            state_dir / "healer.json",
            self.record,
            is_exempt=self.is_exempt,
            nonessential_pids=self.nonessential_pids,
            permissive_for=lambda uid: self.settings.value(uid, "permissive"),
            hooks=TickWatch(self.metrics, self.liveness),  # the watchdog follows the tick
            app_cgroup=self.app_cgroup,
        )
        self.budgets = BudgetWatch(self.registry, self.healer.kill_run)  # runs at their --memory-max
        self.oomwatch = oomwatch.OomWatcher(cfg.events.kmsg, self.store, self.registry, self.metrics,
                                            on_livelock=self.budgets.on_livelock)  # fmt: skip
        self.threads: list[threading.Thread] = []
        self.metrics_server: metrics.MetricsServer | None = None
        self.events_mode = "starting"
        self._peaks: dict[int, int] = {}  # run id -> largest RSS sum sampled
        self._has_peak: dict[int, bool] = {}  # run id -> its own cgroup keeps memory.peak
        self._runs_changed = threading.Event()  # a grant: the reaper watches closely again
        self.metrics.before_scrape(self._sample_gauges)  # read when scraped, not on a timer

    # ------------------------------------------------------------ events

    def on_stored(self, event: dict) -> None:
        """Each event once committed: to the hooks and the log (a coalesced
        repeat, e.g. a refusal flood, to neither)."""
        if event.get("repeat"):
            return
        self.notifier.notify(event)
        kind, data = event["kind"], event["data"]
        events_log.info("%s", event_summary(kind, data),
                        extra={journal.EXTRA_ATTR: journal.event_fields(kind, data)})  # fmt: skip

    def emit(self, kind: str, data: dict, uids: Any = ()) -> None:
        """Queue an event: for threads that serve users (broker, enforcer),
        which must never wait on the database."""
        self.writer.submit(kind, data, uids)

    def record(self, kind: str, data: dict, uids: Any = ()) -> None:
        """Store an event before returning: the healer relies on its events
        being committed before its state file names them."""
        self.store.add(kind, data, uids=list(uids))

    def on_grant(self, run: Run) -> None:
        self._runs_changed.set()
        self.metrics.grant()
        self.emit("grant", run_view(run), [run.uid])

    def _on_record(self, kind: str, runs: list[Run]) -> set[int]:
        """Which of ``runs`` have a ``kind`` event in the store."""
        return self.store.run_ids(kind, min(r.started for r in runs) - 60) if runs else set()

    def _record_what_a_crash_cut_short(self) -> None:
        """A grant's event is written off the broker's loop, so a SIGKILL
        right after the grant can lose it: recorded now, at the run's start."""
        kept_since = time.time() - self.cfg.events.max_age  # older ones the store has pruned, not lost
        runs = [r for r in self.registry.all() if r.started > kept_since]
        recorded = self._on_record("grant", runs)
        for run in runs:
            if run.id not in recorded:
                log.warning("run %d: its grant event was lost (the daemon was killed); recording it now", run.id)
                self.store.add("grant", {**run_view(run), "recorded_late": True}, ts=run.started, uids=[run.uid])

    def on_refusal(self, peer: Peer, reason: str, message: str) -> None:
        # The adapter from the broker's reason string to the shared enum.
        self.metrics.refusal(RefusalReason.parse(reason))
        self.emit("refusal", {"uid": peer.uid, "user": peer.user, "pid": peer.pid,
                              "reason": reason, "message": message}, [peer.uid])  # fmt: skip

    def on_run_end(self, run: Run) -> None:
        sampled = self._peaks.pop(run.id, None)
        self._has_peak.pop(run.id, None)
        if run.peak_memory is None and sampled:
            run = self.registry.update(run.id, peak_memory=sampled) or run
        log.info(
            "run %d ended: user=%s pid=%d exit_status=%s peak_memory=%s reason=%s",
            run.id, run.user, run.pid, run.exit_status, run.peak_memory, run.end_reason,
        )  # fmt: skip
        self.record("run_end", run_view(run), [run.uid])
        if run.extra.get("report") and run.tty:  # oom-protect --report
            try:
                tell_tty(run.tty, run.uid, runreport.summary(self.ops.run_report(run.id, run.uid)))
            except Exception:  # noqa: BLE001 - a report must never stop the reaper
                log.exception("run %d: the report for its terminal failed", run.id)

    def on_policy_change(self, change: policy.Change) -> None:
        if change.ok and not change.dry_run:
            self.emit("policy", change.as_dict(), [change.uid])

    def on_proc_event(self, ev: tuple) -> None:
        kind = ev[0]
        if kind == "exit":
            self.lifecycle.exited(ev[1], ev[2])
        if self.cfg.policy.enforce:
            self.enforcer.handle(ev)  # its on_fork also tells the registry, first
        elif kind == "fork":
            self.lifecycle.member(ev[1], procfs.starttime_of(ev[1]), ev[2], procfs.starttime_of(ev[2]))

    # ------------------------------------------------------------ policy hooks for the healer

    def is_exempt(self, proc: procfs.Proc) -> bool:
        decision = self.enforcer.classify(proc.pid)
        return decision is not None and decision.healer_exempt

    def nonessential_pids(self) -> list[int]:
        app = self.app_cgroup
        procs = [p for p in procfs.iter_processes() if p.cgroup and (p.cgroup == app or p.cgroup.startswith(app + "/"))]
        decisions = policy.plan(procs, policy.classes_for(self.cfg), self.registry)
        return [d.pid for d in decisions if d.class_name and not d.essential and d.uid != 0]

    # ------------------------------------------------------------ threads

    def _thread(self, name: str, target, *args) -> None:
        def guarded() -> None:
            try:
                target(*args)
            except Exception:
                log.exception("thread %s died; stopping the daemon", name)
                self.failed = True
                self.stop.set()

        t = threading.Thread(target=guarded, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def _reaper(self) -> None:
        # Every REAP_EVERY while runs exist; with none, only a grant (or the
        # stop) wakes it, or REAP_IDLE for the registry's upkeep.
        while not self.stop.is_set():
            self._runs_changed.wait(REAP_EVERY if self.registry.active() else REAP_IDLE)
            self._runs_changed.clear()
            for run in self.lifecycle.reap():
                self.on_run_end(run)
            self._sample_peaks()
            self.registry.flush()  # the batched changes; a full disk is logged and retried
        self.registry.flush()

    def _sample_peaks(self) -> None:
        """The largest RSS sum seen, for runs whose peak the kernel does not
        keep: memory.peak needs the memory controller in the run's own
        cgroup, which a cgroup that also holds processes cannot delegate."""
        for run in self.registry.active():
            if run.id not in self._has_peak:
                self._has_peak[run.id] = owns_cgroup(run) and cgroups.memory_peak(run.cgroup or "") is not None
            if self._has_peak[run.id]:
                continue
            rss = sum(procfs.rss_bytes(pid) for pid in self.registry.pids(run))
            if rss > self._peaks.get(run.id, 0):
                self._peaks[run.id] = rss

    def _sample_gauges(self) -> None:
        """The gauges a scrape (or the textfile) reads: app memory, pressure,
        protected processes."""
        app = status.app_slice(self.cfg)
        self.metrics.set_app_memory(app.get("current"), app.get("max"))
        psi = status.pressure_summary(procfs.pressure("memory"))
        if psi:
            self.metrics.set_psi(psi["some_avg10"], psi["full_avg10"])
        self.metrics.set_protected(sum(len(self.registry.pids(run)) for run in self.registry.active()))

    def _events(self) -> None:
        pe = procevents.ProcEvents()
        try:
            pe.open()
        except OSError as e:
            log.warning("process events unavailable (%s); polling every %gs instead", e, self.cfg.policy.poll_interval)
            self.events_mode = "polling"
            if self.cfg.policy.enforce:
                self.enforcer.poll_once(full=True)
                self.policy_applied.set()
                self.enforcer.run_polling(self.stop, self.cfg.policy.poll_interval)
            self.policy_applied.set()
            return
        self.events_mode = "events"
        if self.cfg.policy.enforce:
            self.enforcer.poll_once(full=True)  # what started before we listened
            self._thread("policy-upkeep", self.enforcer.run_upkeep, self.stop)
        self.policy_applied.set()
        pe.run(self.on_proc_event, self.stop)

    def start(self) -> None:
        try:
            procfs.write_oom_score_adj(-1000)
        except OSError as e:
            log.warning("cannot protect the daemon itself (oom_score_adj -1000): %s", e.strerror)
        if not cgroups.is_v2():
            log.warning("no cgroup v2 at %s: runs get no cgroup of their own", cgroups.ROOT)
        self.writer.start()
        self.notifier.start()
        Adoption(self.lifecycle, self.healer.may_end).adopt()  # live runs that runs.json lost
        self._record_what_a_crash_cut_short()  # their grant events too
        ended = self.lifecycle.reap(at_start=True)  # what ended while no daemon watched
        announced = self._on_record("run_end", ended)
        for run in ended:
            if run.id not in announced:
                self.on_run_end(run)
        self.broker.bind()
        self._thread("broker", self.broker.serve, self.stop)
        self._thread("procevents", self._events)
        self._thread("reaper", self._reaper)
        self._thread("oomwatch", self.oomwatch.run, self.stop)
        if self.cfg.healer.enabled:
            self._thread("healer", self.healer.run, self.stop)
        if self.cfg.metrics.listen:
            self.metrics_server = self.metrics.serve(self.cfg.metrics.listen)  # type: ignore[union-attr]
        if self.textfile is not None:
            self._thread("textfile", self.textfile.run, self.stop)
        self._thread("watchdog", self.liveness.run, self.stop)
        log.info("oomguard daemon %d serving %s", os.getpid(), self.cfg.protect.socket)
        # Type=notify: ready once the socket listens and the policy is applied.
        if not self.policy_applied.wait(READY_WAIT):
            log.warning("policy not applied after %gs; reporting ready anyway", READY_WAIT)
        self.systemd.ready(f"serving {self.cfg.protect.socket}")

    def reload(self) -> None:
        """SIGHUP: a valid new config replaces the parts that can change live;
        an invalid one is refused and the old one stays."""
        try:
            new = config.load(self.config_path)
        except config.ConfigError as e:
            log.error("reload refused, keeping the old config: %s", e)
            return
        self.cfg = new
        self.granter.config = new.protect
        self.settings.allowed = frozenset(new.protect.user_settings)
        self.broker.config = new.protect
        self.enforcer.classes = policy.classes_for(new)
        self.systemd.send(status=f"serving {new.protect.socket} (reloaded)")
        log.info("config reloaded from %s (socket, healer and metrics changes need a restart)", new.source or "defaults")

    def shutdown(self) -> None:
        self.systemd.stopping()
        self._runs_changed.set()  # the reaper's and the healer's waits end now
        self.healer.stop_waiting()
        if self.textfile is not None:
            self.textfile.wake()  # its wait ends now, not after the interval
        for t in self.threads:
            t.join(timeout=5)
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.healer.close()
        self.writer.stop()
        self.notifier.stop()
        self.event_reader.close()
        self.store.close()

    def wait(self) -> None:
        # The signal handlers run in this thread and set the event; the long
        # timeout only covers a signal the kernel gave another thread.
        while not self.stop.wait(30.0):
            pass
        self.shutdown()


def main(config_path: str | None = None) -> int:
    try:
        cfg = config.load(config_path)
    except config.ConfigError as e:
        print(f"oomguard: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    try:
        d = Daemon(cfg, config_path)
    except (OSError, events.StoreError) as e:
        log.error("cannot start: %s", e)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: d.stop.set())
    signal.signal(signal.SIGINT, lambda *_: d.stop.set())
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=d.reload, daemon=True).start())
    try:
        d.start()
    except (OSError, RuntimeError, config.ConfigError) as e:
        log.error("cannot start: %s", e)
        d.stop.set()
        return 1
    d.wait()
    return 1 if d.failed else 0
