"""The healer tests' rig: a fake clock (CLOCK_BOOTTIME and wall time moved
by the test), a scripted probe, a Healer wired to a real Metrics, real
processes started as ``nobody`` (the healer never signals root's), runs in a
registry, and a fake cgroup tree's memory.events."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import UTC, datetime
from datetime import time as dtime
from pathlib import Path
from zoneinfo import ZoneInfo

from oomguard.config import (
    Check,
    Config,
    HealerConfig,
    LayoutConfig,
    Service,
    Window,
)
from oomguard.forensics.metrics import Metrics
from oomguard.healer import commands, healer, health, probe_base
from oomguard.host import procfs
from oomguard.host.procfs import Proc
from oomguard.runs.registry import RunRegistry
from oomguard.runs.run import Run

NOBODY = 65534


BOOT = "boot-A"


NIGHT = Window(dtime(23, 0), dtime(7, 0), 900.0)


class FakeClock:
    def __init__(self, wall: float, boot: float = 5000.0):
        self.boot = boot
        self.wall_now = wall

    def boottime(self) -> float:
        return self.boot

    def wall(self) -> float:
        return self.wall_now

    def advance(self, seconds: float) -> None:
        self.boot += seconds
        self.wall_now += seconds


def at(
    hh: int, mm: int, ss: int = 0, tz: str = "UTC", day: tuple[int, int, int] = (2024, 6, 3)
) -> float:
    return datetime(*day, hh, mm, ss, tzinfo=ZoneInfo(tz)).timestamp()


class Scripted:
    """The shop as the probe sees it; the test flips ``up``."""

    def __init__(self):
        self.up = True

    def __call__(self, chk, cancel):
        return probe_base.ProbeResult(self.up, "200" if self.up else "connection refused")


class Rig:
    def __init__(self, tmp_path: Path, wall: float | None = None, **healer_kw):
        self.tmp = tmp_path
        self.clock = FakeClock(wall if wall is not None else at(12, 0))
        self.probe = Scripted()
        self.events: list[tuple[str, dict, list[int]]] = []
        self.metrics = Metrics()  # the real exporter's figures, read back with gauge()
        self.restarts: list[tuple[float, list[str], dict]] = []
        self.on_restart = None
        self.registry = RunRegistry(tmp_path / "runs.json", boot_id=BOOT)
        cfg = dict(
            grace=180.0,
            timezone="UTC",
            windows=(NIGHT,),
            checks=(Check("shop", "command", "probe", interval=5.0, timeout=1.0, failures=2),),
            services=(Service("php-fpm", ("restart-php",)), Service("nginx", ("restart-nginx",))),
            term_timeout=10.0,
            restart_tries=3,
            restart_backoff=5.0,
            restart_backoff_max=12.0,
        )
        cfg.update(healer_kw)
        self.config = Config(healer=HealerConfig(**cfg), layout=LayoutConfig(app_cgroup="app"))

    def emit(self, kind, data, uids):
        self.events.append((kind, data, uids))

    def run_command(self, argv, timeout, **kw):
        self.restarts.append((self.clock.boot, list(argv), kw))
        if self.on_restart:
            self.on_restart()
        return commands.CommandResult(0, False, "")

    def healer(self, boot_id: str = BOOT, **kw) -> healer.Healer:
        monitor = health.HealthMonitor(self.config.healer.checks, self.probe, threaded=False)
        args = dict(
            clock=self.clock,
            boot_id=boot_id,
            monitor=monitor,
            background=False,
            processes=lambda: [],
            run_command=self.run_command,
            hooks=self.metrics,
            kill_timeout=5.0,
        )
        args.update(kw)
        return healer.Healer(
            self.config, self.registry, self.tmp / "healer.json", self.emit, **args
        )

    def step(self, h: healer.Healer, seconds: float, dt: float = 1.0) -> None:
        """Advance the fake clock by ``seconds``, ticking every ``dt``."""
        for _ in range(int(round(seconds / dt))):
            self.clock.advance(dt)
            h.tick()

    def gauge(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    def actions(self, name: str | None = None) -> list[dict]:
        out = [d for k, d, _ in self.events if k == "healer"]
        return [d for d in out if d["action"] == name] if name else out


class Procs:
    """Real processes for kill tests, reaped so that none outlives the test."""

    def __init__(self):
        self.popen: list[subprocess.Popen] = []
        self.extra: list[int] = []

    def start(self, script: str, uid: int = NOBODY) -> tuple[subprocess.Popen, list[int]]:
        """``sh -c script`` as ``uid``; the script may print child pids, one per line."""
        kw = {"user": uid, "group": uid} if uid != 0 else {}
        p = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True, **kw)
        self.popen.append(p)
        if script.startswith("exec "):
            # wait for the exec, so that comm and exe are the program's, not sh's
            prog = script.split()[1]
            deadline = time.monotonic() + 10
            while _comm(p.pid) != prog and time.monotonic() < deadline:
                time.sleep(0.005)
        if script.startswith("trap '' TERM"):
            # a SIGTERM before the trap is set would end the shell: wait for the kernel to show it ignored
            deadline = time.monotonic() + 10
            while not _ignores_term(p.pid) and time.monotonic() < deadline:
                time.sleep(0.005)
        children = []
        if "echo $!" in script:
            children = [int(p.stdout.readline())]
            self.extra += children
        return p, children

    def close(self):
        for p in self.popen:
            if p.poll() is None:
                p.kill()
            p.wait()
        for pid in self.extra:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _ignores_term(pid: int) -> bool:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    except OSError:
        pass
    return False


def _comm(pid: int) -> str | None:
    proc = procfs.snapshot(pid)
    return proc.comm if proc else None


def alive(pid: int) -> bool:
    proc = procfs.snapshot(pid)
    return proc is not None and proc.state != "Z"


def wait_dead(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def add_run(
    registry: RunRegistry, pid: int, uid: int = NOBODY, cgroup: str | None = None, **kw
) -> Run:
    run = Run(
        id=registry.new_id(),
        uid=uid,
        user="nobody" if uid == NOBODY else str(uid),
        pid=pid,
        starttime=kw.pop("starttime", None) or procfs.starttime_of(pid),
        started=time.time(),
        command=kw.pop("command", "php bin/magento import"),
        cgroup=cgroup,
        **kw,
    )
    registry.add(run)
    return run


IGNORES_TERM = "trap '' TERM; sleep 1000 & echo $!; wait"


def down_at(rig: Rig, h: healer.Healer) -> float:
    """Make the shop fail from the next probe on; returns that probe's boottime."""
    h.tick()  # a healthy probe now
    rig.probe.up = False
    rig.step(h, 5)
    return rig.clock.boot


def fake_proc(
    pid: int, uid: int, exe: str = "/usr/bin/php8.2", adj: int = -1000, comm: str = "php"
) -> Proc:
    return Proc(pid, 1, comm, "R", uid, 100, 1000, adj, 0, exe, "/app", 0)


def write_events(root: Path, oom: int, oom_kill: int) -> None:
    (root / "app" / "memory.events").write_text(
        f"low 0\nhigh 0\nmax {oom * 3}\noom {oom}\noom_kill {oom_kill}\noom_group_kill 0\n"
    )


def storm(rig: Rig, h: healer.Healer, root: Path, kills: list[int], dt: float = 0.5) -> None:
    for n in kills:
        write_events(root, oom=n, oom_kill=n)
        rig.clock.advance(dt)
        h.tick()


def cfg(**kw) -> HealerConfig:
    base = dict(grace=180.0, timezone="UTC", windows=(NIGHT,))
    base.update(kw)
    return HealerConfig(**base)


def utc(y, mo, d, hh, mm) -> float:
    return datetime(y, mo, d, hh, mm, tzinfo=UTC).timestamp()
