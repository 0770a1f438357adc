"""`oomguard daemon`: wires the parts together and runs them in threads.

Threads, each with one concern, so that none can stall another:
  broker     the socket: grants and queries (broker.py)
  procevents fork/exec/exit from the kernel, or a polling fallback
  reaper     ends runs whose cgroups emptied, with their exit status
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

from . import broker, config, procevents, procfs
from .broker import Broker, Granter, Peer, Refusal
from .runs import Run, RunRegistry, decode_wait_status

log = logging.getLogger("oomguard.daemon")


def setup_logging(level: str) -> None:
    """stderr, one line per record, with a syslog priority prefix that
    journald understands (<3> error ... <7> debug)."""
    prio = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}

    class JournalFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            text = super().format(record).replace("\n", " | ")
            return f"<{prio.get(record.levelname, 6)}>{record.name}: {text}"

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def run_view(run: Run) -> dict:
    return {
        "id": run.id,
        "user": run.user,
        "uid": run.uid,
        "pid": run.pid,
        "command": run.command,
        "cgroup": run.cgroup,
        "tty": run.tty,
        "started": run.started,
        "ended": run.ended,
        "exit_status": run.exit_status,
        "peak_memory": run.peak_memory,
        "end_reason": run.end_reason,
    }


class Daemon:
    def __init__(self, cfg: config.Config, config_path: str | None = None):
        self.cfg = cfg
        self.config_path = config_path
        self.stop = threading.Event()
        state_dir = Path(cfg.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.registry = RunRegistry(state_dir / "runs.json")
        self.granter = Granter(cfg.protect, self.registry, self.on_grant, self.on_refusal)
        self.broker = Broker(cfg, self.granter, self.handlers())
        self.threads: list[threading.Thread] = []
        self.events_mode = "none"

    # ------------------------------------------------------------ hooks

    def on_grant(self, run: Run) -> None:
        pass

    def on_refusal(self, peer: Peer, reason: str, message: str) -> None:
        pass

    def on_run_end(self, run: Run) -> None:
        log.info(
            "run %d ended: user=%s pid=%d exit_status=%s peak_memory=%s reason=%s",
            run.id, run.user, run.pid, run.exit_status, run.peak_memory, run.end_reason,
        )  # fmt: skip

    def on_proc_event(self, ev: tuple) -> None:
        kind = ev[0]
        if kind == "exit":
            run = self.registry.by_pid(ev[1])
            if run is not None and run.exit_status is None:
                self.registry.update(run.id, exit_status=decode_wait_status(ev[2]))
        elif kind == "fork":
            self.registry.on_fork(ev[1], procfs.starttime_of(ev[1]), ev[2], procfs.starttime_of(ev[2]))

    # ------------------------------------------------------------ socket ops

    def handlers(self) -> dict[str, broker.Handler]:
        return {"runs": self.op_runs, "kill-run": self.op_kill_run}

    def op_runs(self, peer: Peer, request: dict) -> dict:
        runs = self.registry.all() if request.get("all") else self.registry.active()
        if peer.uid != 0:
            runs = [r for r in runs if r.uid == peer.uid]
        return {"runs": [run_view(r) for r in runs]}

    def op_kill_run(self, peer: Peer, request: dict) -> dict:
        if peer.uid != 0:
            raise Refusal("only root may kill runs")
        raise Refusal("kill-run needs the healer, which is not wired yet")

    # ------------------------------------------------------------ threads

    def _thread(self, name: str, target, *args) -> None:
        def guarded() -> None:
            try:
                target(*args)
            except Exception:
                log.exception("thread %s died; stopping the daemon", name)
                self.stop.set()

        t = threading.Thread(target=guarded, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def _reaper(self) -> None:
        while not self.stop.wait(0.5):
            for run in self.registry.reap():
                self.on_run_end(run)

    def _events(self) -> None:
        pe = procevents.ProcEvents()
        try:
            pe.open()
        except OSError as e:
            log.warning("process events unavailable (%s); exit statuses of runs will be unknown", e)
            self.events_mode = "poll"
            return
        self.events_mode = "events"
        pe.run(self.on_proc_event, self.stop)

    def start(self) -> None:
        try:
            procfs.write_oom_score_adj(-1000)
        except OSError as e:
            log.warning("cannot protect the daemon itself (oom_score_adj -1000): %s", e.strerror)
        self.broker.bind()
        self._thread("broker", self.broker.serve, self.stop)
        self._thread("procevents", self._events)
        self._thread("reaper", self._reaper)
        log.info("oomguard daemon %d serving %s", os.getpid(), self.cfg.protect.socket)

    def reload(self) -> None:
        try:
            new = config.load(self.config_path)
        except config.ConfigError as e:
            log.error("reload refused, keeping the old config: %s", e)
            return
        self.cfg = new
        self.granter.config = new.protect
        log.info("config reloaded from %s", new.source or "defaults")

    def wait(self) -> None:
        while not self.stop.wait(0.5):
            pass
        for t in self.threads:
            t.join(timeout=3)


def main(config_path: str | None = None) -> int:
    try:
        cfg = config.load(config_path)
    except config.ConfigError as e:
        print(f"oomguard: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    d = Daemon(cfg, config_path)
    signal.signal(signal.SIGTERM, lambda *_: d.stop.set())
    signal.signal(signal.SIGINT, lambda *_: d.stop.set())
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=d.reload, daemon=True).start())
    try:
        d.start()
    except (OSError, RuntimeError) as e:
        log.error("cannot start: %s", e)
        return 1
    d.wait()
    time.sleep(0)
    return 0
