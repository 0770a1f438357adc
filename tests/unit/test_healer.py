"""The auto-healer: the downtime clock, grace windows, the action on real
processes, restarts with back-off, dry-run, the never-kill rules, the storm
guard and livelock detection (on a fake cgroup tree), and the loop's cadence
with hung endpoints.

The clock is fake wherever time matters (FakeClock: CLOCK_BOOTTIME and wall
time moved by the test); processes are real, started as ``nobody`` because
the healer never signals root's processes."""

from __future__ import annotations

import logging
import os
import pty
import signal
import socket
import subprocess
import threading
import time
from datetime import UTC, datetime
from datetime import time as dtime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from oomguard.config import (
    Check,
    Config,
    HealerConfig,
    LayoutConfig,
    Service,
    Window,
    login_uid_range,
)
from oomguard.forensics.metrics import Metrics
from oomguard.healer import commands, grace, guard, healer, health, killer, probe_base, tty
from oomguard.host import cgroups, procfs
from oomguard.host import statefile as state
from oomguard.host.procfs import Proc
from oomguard.runs.registry import Run, RunRegistry

NOBODY = 65534
BOOT = "boot-A"
NIGHT = Window(dtime(23, 0), dtime(7, 0), 900.0)


# ---------------------------------------------------------------- fixtures


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


@pytest.fixture(autouse=True)
def fake_cgroupfs(tmp_path, monkeypatch):
    """No test touches the host's cgroupfs: the healer sees this tree."""
    root = tmp_path / "cgroupfs"
    (root / "app").mkdir(parents=True)
    monkeypatch.setattr(cgroups, "ROOT", root)
    return root


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


@pytest.fixture
def rig(tmp_path):
    return Rig(tmp_path)


# ---------------------------------------------------------------- processes


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


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.close()


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


# ---------------------------------------------------------------- windows


def cfg(**kw) -> HealerConfig:
    base = dict(grace=180.0, timezone="UTC", windows=(NIGHT,))
    base.update(kw)
    return HealerConfig(**base)


@pytest.mark.parametrize(
    "hh, mm, expected",
    [
        (12, 0, ("default", 180.0)),
        (22, 59, ("default", 180.0)),
        (23, 0, ("23:00-07:00", 900.0)),
        (0, 0, ("23:00-07:00", 900.0)),  # wrapped past midnight
        (3, 30, ("23:00-07:00", 900.0)),
        (6, 59, ("23:00-07:00", 900.0)),
        (7, 0, ("default", 180.0)),  # the end is exclusive
    ],
)
def test_window_table_wraps_midnight(hh, mm, expected):
    c = grace.choose_window(cfg(), at(hh, mm))
    assert (c.name, c.grace) == expected


def test_window_table_several_windows():
    lunch = Window(dtime(12, 0), dtime(13, 30), 60.0)
    c = cfg(windows=(NIGHT, lunch))
    assert grace.choose_window(c, at(12, 15)).grace == 60.0
    assert grace.choose_window(c, at(13, 30)).grace == 180.0
    assert grace.choose_window(c, at(23, 30)).grace == 900.0


def test_window_no_windows_means_default():
    assert grace.choose_window(cfg(windows=()), at(3, 0)).name == "default"


def test_window_timezone_is_applied():
    c = cfg(timezone="Asia/Tokyo")  # UTC+9, no DST
    assert grace.choose_window(c, at(14, 30)).name == "23:00-07:00"  # 23:30 in Tokyo
    assert grace.choose_window(c, at(22, 30)).name == "default"  # 07:30 in Tokyo


def utc(y, mo, d, hh, mm) -> float:
    return datetime(y, mo, d, hh, mm, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    "instant, expected",
    [
        # 2024-03-31, clocks go 02:00 CET -> 03:00 CEST
        (utc(2024, 3, 31, 4, 30), "23:00-07:00"),  # 06:30 CEST
        (utc(2024, 3, 31, 5, 30), "default"),  # 07:30 CEST (a fixed UTC+1 would say 06:30)
        (utc(2024, 3, 30, 21, 59), "default"),  # 22:59 CET the evening before
        (utc(2024, 3, 30, 22, 0), "23:00-07:00"),  # 23:00 CET
        # 2024-10-27, clocks go 03:00 CEST -> 02:00 CET
        (utc(2024, 10, 27, 5, 30), "23:00-07:00"),  # 06:30 CET (a fixed UTC+2 would say 07:30)
        (utc(2024, 10, 27, 6, 0), "default"),  # 07:00 CET
        (utc(2024, 10, 26, 20, 59), "default"),  # 22:59 CEST
        (utc(2024, 10, 26, 21, 0), "23:00-07:00"),  # 23:00 CEST
    ],
)
def test_window_on_dst_days_in_amsterdam(instant, expected):
    assert grace.choose_window(cfg(timezone="Europe/Amsterdam"), instant).name == expected


def test_window_in_the_repeated_and_the_skipped_hour():
    two_to_three = Window(dtime(2, 0), dtime(3, 0), 42.0)
    c = cfg(timezone="Europe/Amsterdam", windows=(two_to_three,))
    # 02:30 happens twice on 2024-10-27: both are in the window
    assert grace.choose_window(c, utc(2024, 10, 27, 0, 30)).grace == 42.0
    assert grace.choose_window(c, utc(2024, 10, 27, 1, 30)).grace == 42.0
    # 02:00-03:00 does not exist on 2024-03-31: 01:59 CET then 03:00 CEST
    assert grace.choose_window(c, utc(2024, 3, 31, 0, 59)).grace == 180.0
    assert grace.choose_window(c, utc(2024, 3, 31, 1, 0)).grace == 180.0


def test_backoff_doubles_up_to_the_cap():
    c = cfg(restart_backoff=5.0, restart_backoff_max=30.0, restart_tries=6)
    assert grace.backoff_delays(c) == [5.0, 10.0, 20.0, 30.0, 30.0, 30.0]


# ---------------------------------------------------------------- the clock


def down_at(rig: Rig, h: healer.Healer) -> float:
    """Make the shop fail from the next probe on; returns that probe's boottime."""
    h.tick()  # a healthy probe now
    rig.probe.up = False
    rig.step(h, 5)
    return rig.clock.boot


def test_downtime_starts_at_the_first_failing_probe(rig):
    h = rig.healer()
    first_fail = down_at(rig, h)
    assert h.incident is None  # one failure is below the threshold of 2
    rig.step(h, 5)
    assert h.incident is not None
    assert h.incident.start == first_fail  # not the probe that crossed the threshold
    assert h.incident.start_wall == pytest.approx(at(12, 0, 5))
    st = h.status()
    assert st["down_since"] == pytest.approx(at(12, 0, 5))
    assert st["window"] == "default" and st["grace"] == 180.0
    assert st["time_left"] == pytest.approx(175.0)
    assert [a["action"] for a in rig.actions()] == ["down"]


def test_the_healer_acts_when_downtime_reaches_the_grace(rig):
    h = rig.healer()
    first_fail = down_at(rig, h)
    rig.step(h, 174)
    assert rig.restarts == []
    rig.step(h, 1)
    assert rig.clock.boot == first_fail + 175
    assert rig.restarts == []
    rig.step(h, 5)
    assert rig.restarts and rig.restarts[0][0] == first_fail + 180


def test_recovery_ends_the_clock_at_the_first_healthy_probe(rig):
    h = rig.healer()
    first_fail = down_at(rig, h)
    rig.step(h, 40)
    rig.probe.up = True
    rig.step(h, 5)
    recovered = rig.actions("recovered")
    assert len(recovered) == 1
    assert recovered[0]["downtime"] == pytest.approx(45.0)
    assert rig.clock.boot - first_fail == 45
    assert h.incident is None and h.status()["phase"] == "watching"
    assert rig.restarts == []  # within the grace: nothing done
    assert state.read_json(rig.tmp / "healer.json")["incident"] is None


def test_clock_survives_a_daemon_restart(rig):
    h = rig.healer()
    first_fail = down_at(rig, h)
    rig.step(h, 60)
    assert h.incident is not None
    del h  # the daemon dies mid-incident
    rig.clock.advance(30)  # and is back 30 s later
    h2 = rig.healer()
    assert h2.incident is not None and h2.incident.start == first_fail
    st = h2.status()
    assert st["down_since"] == pytest.approx(at(12, 0, 5))
    assert st["time_left"] == pytest.approx(180 - 90)
    # The fresh monitor has seen nothing yet: the clock goes on, it does not restart.
    rig.step(h2, 89)
    assert rig.restarts == []
    rig.step(h2, 1)
    assert rig.restarts and rig.restarts[0][0] == first_fail + 180


def test_restart_with_a_healthy_shop_ends_the_incident(rig):
    h = rig.healer()
    down_at(rig, h)
    rig.step(h, 20)
    rig.probe.up = True
    h2 = rig.healer()
    rig.step(h2, 1)
    assert h2.incident is None
    assert rig.actions("recovered")[0]["downtime"] == pytest.approx(21.0)


def test_incident_of_an_earlier_boot_is_void(rig):
    h = rig.healer()
    down_at(rig, h)
    rig.step(h, 60)
    h2 = rig.healer(boot_id="boot-B")
    assert h2.incident is None
    assert h2.status()["time_left"] is None
    assert state.read_json(rig.tmp / "healer.json")["incident"] is None


@pytest.mark.parametrize("jump", [3 * 3600.0, -2 * 3600.0, 11 * 3600.0])
def test_wall_clock_jumps_do_not_move_the_clock(rig, jump):
    h = rig.healer()
    first_fail = down_at(rig, h)
    rig.step(h, 10)
    window = h.incident.window
    rig.clock.wall_now += jump  # NTP step, or an operator's `date -s`
    rig.step(h, 5)
    st = h.status()
    assert st["window"] == window == "default"  # 12:00 + 11 h would be night
    assert st["time_left"] == pytest.approx(180 - 15)
    rig.step(h, 164)
    assert rig.restarts == []
    rig.step(h, 1)
    assert rig.restarts and rig.restarts[0][0] == first_fail + 180


def test_outage_starting_just_before_a_window_keeps_the_day_grace(tmp_path):
    rig = Rig(tmp_path, wall=at(22, 58, 55))
    h = rig.healer()
    first_fail = down_at(rig, h)  # 22:59:00
    rig.step(h, 5)
    assert h.incident.window == "default" and h.incident.grace == 180.0
    rig.step(h, 175)  # 23:02:00, inside the night window by now
    assert rig.restarts and rig.restarts[0][0] == first_fail + 180


def test_outage_starting_in_the_window_gets_its_grace(tmp_path):
    rig = Rig(tmp_path, wall=at(22, 59, 55))
    h = rig.healer()
    first_fail = down_at(rig, h)  # 23:00:00
    rig.step(h, 5)
    assert h.incident.window == "23:00-07:00" and h.incident.grace == 900.0
    rig.step(h, 300)
    assert rig.restarts == []
    rig.step(h, 600)
    assert rig.restarts and rig.restarts[0][0] == first_fail + 900


def test_window_status_without_an_incident(tmp_path):
    rig = Rig(tmp_path, wall=at(2, 0))
    h = rig.healer()
    h.tick()
    ws = h.window_status()
    assert ws == {"window": "23:00-07:00", "grace": 900.0, "down": False, "time_left": None}


# ---------------------------------------------------------------- restarts


def test_restart_even_without_protected_processes(rig):
    rig.on_restart = lambda: setattr(rig.probe, "up", True)
    h = rig.healer()
    down_at(rig, h)
    rig.step(h, 180)
    assert [r[1] for r in rig.restarts] == [["restart-php"], ["restart-nginx"]]
    for _, _, kw in rig.restarts:
        assert kw["oom_score_adj"] == 0  # never the daemon's -1000
        assert kw["kill_group"] is False
    rig.step(h, 1)
    assert h.incident is None
    actions = [a["action"] for a in rig.actions()]
    assert actions == ["down", "restart", "recovered"]
    assert rig.actions("recovered")[0]["restart_tries"] == 1


def test_restart_backs_off_and_gives_up(tmp_path):
    rig = Rig(tmp_path, restart_tries=4, restart_backoff=5.0, restart_backoff_max=12.0)
    h = rig.healer()
    down_at(rig, h)
    rig.step(h, 180)
    rig.step(h, 60)
    tries = [r[0] for r in rig.restarts if r[1] == ["restart-php"]]
    assert len(tries) == 4
    assert [b - a for a, b in zip(tries, tries[1:], strict=False)] == [5.0, 10.0, 12.0]
    restarts = rig.actions("restart")
    assert [r["try"] for r in restarts] == [1, 2, 3, 4]
    assert [r["verify_for"] for r in restarts] == [5.0, 10.0, 12.0, 12.0]
    gave_up = rig.actions("gave_up")
    assert len(gave_up) == 1 and gave_up[0]["tries"] == 4
    assert h.status()["phase"] == "gave_up"
    rig.step(h, 120)
    assert len(rig.restarts) == 8  # no fifth try


def test_restart_tries_survive_a_daemon_restart(rig):
    h = rig.healer()
    down_at(rig, h)
    rig.step(h, 180)
    assert len(rig.actions("restart")) == 1
    h2 = rig.healer()
    assert h2.incident.tries == 1 and h2.incident.phase == "verifying"
    rig.step(h2, 5)
    assert [r["try"] for r in rig.actions("restart")] == [1, 2]


def test_restart_in_the_background_with_real_commands(tmp_path):
    marker = tmp_path / "restarted"
    rig = Rig(tmp_path, services=(Service("svc", ("sh", "-c", f"echo $$ > {marker}")),))
    h = rig.healer(background=True, run_command=commands.run_command)
    down_at(rig, h)
    rig.step(h, 180)
    deadline = time.monotonic() + 20
    while not rig.actions("restart"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
        h.tick()
    assert marker.exists()
    restart = rig.actions("restart")[0]
    assert restart["services"][0]["ok"] is True


# ---------------------------------------------------------------- the action on real processes


def test_full_incident_kills_the_protected_run_and_restarts(rig, procs):
    p, (child,) = procs.start(IGNORES_TERM)
    run = add_run(rig.registry, p.pid)
    rig.registry.add_member((child, procfs.starttime_of(child)), run.id)
    rig.on_restart = lambda: setattr(rig.probe, "up", True)
    h = rig.healer()
    first_fail = down_at(rig, h)
    rig.step(h, 180)
    assert h.incident.phase == "terminating"
    term = rig.actions("term")
    assert term and term[0]["run"] == run.id and sorted(term[0]["pids"]) == sorted([p.pid, child])
    assert alive(p.pid) and alive(child)  # they ignore SIGTERM
    assert rig.registry.get(run.id).end_reason == killer.KILLED_BY_HEALER
    rig.step(h, 10)  # term_timeout
    deadline = time.monotonic() + 10
    while h.incident is not None and h.incident.phase == "killing":
        assert time.monotonic() < deadline
        time.sleep(0.02)
        h.tick()
    assert p.wait(5) == -signal.SIGKILL
    assert wait_dead(child)
    killed = rig.actions("killed")
    assert len(killed) == 1 and killed[0]["run"] == run.id and killed[0]["owner"] == "nobody"
    assert killed[0]["method"] == "pidfd"
    assert [
        uids for kind, d, uids in rig.events if kind == "healer" and d["action"] == "killed"
    ] == [[NOBODY]]
    # the reaper records the end (and emits run_end) with the healer's reason
    (ended,) = [r for r in rig.registry.reap() if r.id == run.id]
    assert not ended.active and ended.end_reason == killer.KILLED_BY_HEALER
    assert rig.restarts
    rig.step(h, 1)
    assert h.incident is None
    rec = rig.actions("recovered")[0]
    assert rec["killed_runs"] == [run.id]
    assert rec["downtime"] == pytest.approx(rig.clock.boot - first_fail)


def test_incident_that_heals_within_grace_kills_nothing(rig, procs):
    p, _ = procs.start("exec sleep 1000")
    add_run(rig.registry, p.pid)
    h = rig.healer()
    down_at(rig, h)
    rig.step(h, 100)
    rig.probe.up = True
    rig.step(h, 200)
    assert alive(p.pid)
    assert rig.actions("term") == [] and rig.restarts == []


def test_kill_run_sigterm_is_enough_for_a_polite_run(rig, procs):
    p, _ = procs.start("exec sleep 1000")
    run = add_run(rig.registry, p.pid)
    h = rig.healer()
    rec = h.kill_run(run.id)
    assert rec["action"] == "killed"
    assert p.wait(5) == -signal.SIGTERM
    assert rig.registry.get(run.id).end_reason == killer.KILLED_BY_HEALER


def test_kill_run_escalates_to_sigkill(tmp_path, procs):
    rig = Rig(tmp_path, term_timeout=0.3)
    p, (child,) = procs.start(IGNORES_TERM)
    run = add_run(rig.registry, p.pid)
    rig.registry.add_member((child, procfs.starttime_of(child)), run.id)
    rec = rig.healer().kill_run(run)
    assert rec["action"] == "killed", rec
    assert p.wait(5) == -signal.SIGKILL
    assert wait_dead(child)
    assert [r.end_reason for r in rig.registry.reap()] == [killer.KILLED_BY_HEALER]
    assert rig.events[-1][2] == [NOBODY]


def test_kill_run_does_not_signal_a_reused_pid(rig, procs):
    p, _ = procs.start("exec sleep 1000")
    run = add_run(rig.registry, p.pid, starttime=procfs.starttime_of(p.pid) - 1)
    rec = rig.healer().kill_run(run)
    assert rec["action"] == "already_gone"
    assert alive(p.pid)
    assert rig.registry.get(run.id).end_reason is None


def test_kill_run_in_its_own_cgroup_uses_cgroup_kill(tmp_path, fake_cgroupfs, procs, monkeypatch):
    rig = Rig(tmp_path, term_timeout=0.2)
    p, _ = procs.start("trap '' TERM; while :; do sleep 1; done")
    (fake_cgroupfs / "app" / "run-1").mkdir()
    (fake_cgroupfs / "app" / "run-1" / "cgroup.procs").write_text(f"{p.pid}\n")
    killed_cgroups = []

    def fake_kill(cg):
        killed_cgroups.append(cg)
        for pid in cgroups.procs(cg):
            os.kill(pid, signal.SIGKILL)

    monkeypatch.setattr(cgroups, "kill", fake_kill)
    run = add_run(rig.registry, p.pid, cgroup="/app/run-1")
    rec = rig.healer().kill_run(run)
    assert killed_cgroups == ["/app/run-1"]  # the run's own, never /app
    assert rec["method"] == "cgroup.kill" and rec["action"] == "killed"
    assert p.wait(5) == -signal.SIGKILL


def test_kill_run_never_uses_cgroup_kill_on_the_shared_app_cgroup(
    tmp_path, fake_cgroupfs, procs, monkeypatch
):
    rig = Rig(tmp_path, term_timeout=0.2)
    p, _ = procs.start("trap '' TERM; while :; do sleep 1; done")
    (fake_cgroupfs / "app" / "cgroup.procs").write_text(f"{p.pid}\n")
    monkeypatch.setattr(cgroups, "kill", lambda cg: pytest.fail(f"cgroup.kill on {cg}"))
    run = add_run(rig.registry, p.pid, cgroup="/app")
    rec = rig.healer().kill_run(run)
    assert rec["method"] == "pidfd" and rec["action"] == "killed"
    assert p.wait(5) == -signal.SIGKILL


def test_cgroup_holding_a_root_process_is_killed_one_by_one(
    tmp_path, fake_cgroupfs, procs, monkeypatch
):
    rig = Rig(tmp_path, term_timeout=0.2)
    user, _ = procs.start("trap '' TERM; while :; do sleep 1; done")
    root, _ = procs.start("exec sleep 1000", uid=0)
    (fake_cgroupfs / "app" / "run-1").mkdir()
    (fake_cgroupfs / "app" / "run-1" / "cgroup.procs").write_text(f"{user.pid}\n{root.pid}\n")
    monkeypatch.setattr(cgroups, "kill", lambda cg: pytest.fail(f"cgroup.kill on {cg}"))
    run = add_run(rig.registry, user.pid, cgroup="/app/run-1")
    rec = rig.healer().kill_run(run)
    assert user.wait(5) == -signal.SIGKILL
    assert alive(root.pid)
    assert rec["action"] == "spared_some"
    assert rec["skipped"] == {str(root.pid): "root's process"}
    assert rig.registry.get(run.id).active  # something of it still runs


# ---------------------------------------------------------------- never kill


def test_never_kills_root(rig, procs):
    p, _ = procs.start("exec sleep 1000", uid=0)
    run = add_run(
        rig.registry, p.pid, uid=NOBODY
    )  # the registry may be wrong; the uid check is not
    rec = rig.healer().kill_run(run)
    assert alive(p.pid)
    assert rec["skipped"] == {str(p.pid): "root's process"}


def test_never_kills_oomguard_itself(rig):
    run = add_run(rig.registry, os.getpid())
    rec = rig.healer().kill_run(run)
    assert rec["skipped"] == {str(os.getpid()): "oomguard itself"}


def test_never_kills_what_the_policy_exempts(rig, procs):
    p, _ = procs.start("exec sleep 1000")
    run = add_run(rig.registry, p.pid)
    rec = rig.healer(is_exempt=lambda proc: proc.pid == p.pid).kill_run(run)
    assert alive(p.pid)
    assert rec["skipped"] == {str(p.pid): "exempt by policy"}


def test_a_failing_exemption_check_means_exempt(rig, procs):
    p, _ = procs.start("exec sleep 1000")
    run = add_run(rig.registry, p.pid)

    def broken(proc):
        raise RuntimeError("policy not loaded")

    rec = rig.healer(is_exempt=broken).kill_run(run)
    assert alive(p.pid)
    assert rec["skipped"] == {str(p.pid): "exemption check failed"}


def test_exemption_is_rechecked_right_before_sigkill(tmp_path, procs):
    """A process exempt by the time SIGKILL is due is spared, although it was
    fair game at SIGTERM time."""
    rig = Rig(tmp_path, term_timeout=10.0)
    p, _ = procs.start("trap '' TERM; while :; do sleep 1; done")
    run = add_run(rig.registry, p.pid)
    exempt = set()
    h = rig.healer(is_exempt=lambda proc: proc.pid in exempt)
    down_at(rig, h)
    rig.step(h, 180)
    assert rig.actions("term")
    exempt.add(p.pid)
    rig.step(h, 10)  # SIGKILL is due now
    rig.step(h, 1)
    time.sleep(0.2)
    assert alive(p.pid)
    spared = rig.actions("spared_some")
    assert len(spared) == 1 and spared[0]["skipped"] == {str(p.pid): "exempt by policy"}
    assert rig.registry.get(run.id).active and rig.registry.get(run.id).end_reason is None


def fake_proc(
    pid: int, uid: int, exe: str = "/usr/bin/php8.2", adj: int = -1000, comm: str = "php"
) -> Proc:
    return Proc(pid, 1, comm, "R", uid, 100, 1000, adj, 0, exe, "/app", 0)


def test_database_is_recognised_by_its_system_executable():
    assert guard.is_database(fake_proc(1, 105, exe="/usr/sbin/mariadbd"))
    assert guard.is_database(fake_proc(1, 105, exe="/usr/sbin/mysqld (deleted)"))
    assert not guard.is_database(fake_proc(1, 1000, exe="/home/app/mariadbd"))  # a user's copy
    assert not guard.is_database(fake_proc(1, 1000, exe="/usr/bin/php8.2", comm="mariadbd"))


def test_selection_of_protected_processes_outside_runs(rig):
    lo, _ = login_uid_range()
    fakes = [
        fake_proc(101, 0),  # root
        fake_proc(102, 105, exe="/usr/sbin/mariadbd"),  # the database
        fake_proc(103, lo, exe="/usr/sbin/mariadbd"),  # the database, even as a login user
        fake_proc(104, lo),  # exempt by policy
        fake_proc(os.getpid(), lo),  # oomguard itself
        fake_proc(106, 33),  # a system account (www-data)
        fake_proc(107, lo, adj=0),  # not protected
        fake_proc(108, lo),  # the one to kill
        fake_proc(109, lo + 1),  # another owner
    ]
    h = rig.healer(processes=lambda: fakes, is_exempt=lambda proc: proc.pid == 104)
    targets = h.select_targets()
    assert [(t.uid, [p.pid for p in t.orphans]) for t in targets] == [(lo, [108]), (lo + 1, [109])]
    assert all(t.run is None for t in targets)


# ---------------------------------------------------------------- dry run


def test_dry_run_decides_but_acts_on_nothing(tmp_path, procs, caplog):
    rig = Rig(tmp_path, dry_run=True)
    p, _ = procs.start("exec sleep 1000")
    run = add_run(rig.registry, p.pid)
    h = rig.healer()
    caplog.set_level(logging.WARNING, logger="oomguard.healer")
    down_at(rig, h)
    rig.step(h, 300)
    assert alive(p.pid)
    assert rig.restarts == []
    assert rig.registry.get(run.id).end_reason is None and rig.registry.get(run.id).active
    would = rig.actions("would_kill")
    assert len(would) == 1 and would[0]["run"] == run.id and would[0]["dry_run"] is True
    assert "longer than the 3m00s grace" in would[0]["reason"]
    assert rig.actions("would_restart")[0]["services"] == ["php-fpm", "nginx"]
    assert h.status()["phase"] == "dry_run"
    text = caplog.text
    assert (
        "dry-run: would kill run" in text
        and "dry-run: would restart services php-fpm,nginx" in text
    )
    assert "dry-run: shop down" in text


# ---------------------------------------------------------------- the terminal


def _pty_owned_by(uid: int):
    master, slave = pty.openpty()
    name = os.ttyname(slave)
    os.chown(name, uid, -1)
    return master, slave, name


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = b""
    try:
        while chunk := os.read(fd, 4096):
            out += chunk
    except BlockingIOError:
        pass
    return out


def test_the_owner_is_told_on_the_runs_terminal(tmp_path, procs):
    rig = Rig(tmp_path, term_timeout=0.3)
    master, slave, name = _pty_owned_by(NOBODY)
    try:
        p, _ = procs.start("exec sleep 1000")
        run = add_run(rig.registry, p.pid, tty=name)
        rec = rig.healer().kill_run(run, why="the shop was down for 3m05s")
        assert rec["told_tty"] is True
        text = _read_all(master).decode()
        assert f"protected run {run.id}" in text and "the shop was down for 3m05s" in text
    finally:
        os.close(master)
        os.close(slave)


def test_no_message_to_a_terminal_the_owner_does_not_own(tmp_path, procs):
    rig = Rig(tmp_path, term_timeout=0.3)
    master, slave, name = _pty_owned_by(0)
    try:
        p, _ = procs.start("exec sleep 1000")
        run = add_run(rig.registry, p.pid, tty=name)
        rec = rig.healer().kill_run(run)
        assert rec["told_tty"] is False
        assert _read_all(master) == b""
    finally:
        os.close(master)
        os.close(slave)


def test_tell_tty_never_blocks_on_a_full_terminal():
    master, slave, name = _pty_owned_by(NOBODY)
    try:
        os.set_blocking(slave, False)
        try:
            while True:
                os.write(slave, b"x" * 4096)  # nobody reads the master: fill it up
        except BlockingIOError:
            pass
        result = []
        t = threading.Thread(
            target=lambda: result.append(tty.tell_tty(name, NOBODY, "hello")), daemon=True
        )
        t.start()
        t.join(10)
        assert result, "tell_tty blocked on a full terminal"
    finally:
        os.close(master)
        os.close(slave)


def test_tell_tty_refuses_paths_that_are_not_terminals(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    assert not tty.tell_tty(str(f), 0, "x")
    assert not tty.tell_tty("/dev/pts/../../etc/passwd", 0, "x")
    assert f.read_text() == ""


# ---------------------------------------------------------------- storm guard


def write_events(root: Path, oom: int, oom_kill: int) -> None:
    (root / "app" / "memory.events").write_text(
        f"low 0\nhigh 0\nmax {oom * 3}\noom {oom}\noom_kill {oom_kill}\noom_group_kill 0\n"
    )


def storm(rig: Rig, h: healer.Healer, root: Path, kills: list[int], dt: float = 0.5) -> None:
    for n in kills:
        write_events(root, oom=n, oom_kill=n)
        rig.clock.advance(dt)
        h.tick()


def test_storm_kills_the_nonessential_processes(rig, fake_cgroupfs, procs):
    victim, _ = procs.start("exec sleep 1000")
    h = rig.healer(nonessential_pids=lambda: [victim.pid])
    storm(rig, h, fake_cgroupfs, [0, 2, 6])  # 6 kills in a second >= 5
    assert victim.wait(5) == -signal.SIGKILL
    ev = [(d, uids) for k, d, uids in rig.events if k == "storm"]
    assert len(ev) == 1
    assert ev[0][0]["killed"] == [{"pid": victim.pid, "comm": "sleep", "uid": NOBODY}]
    assert ev[0][1] == [NOBODY]
    assert h.status()["storm"]["active"] is True


def test_no_storm_below_the_rate(rig, fake_cgroupfs, procs):
    victim, _ = procs.start("exec sleep 1000")
    h = rig.healer(nonessential_pids=lambda: [victim.pid])
    storm(rig, h, fake_cgroupfs, [0, 1, 2, 3, 4, 5, 6, 7, 8], dt=0.5)  # 2 kills/s
    assert alive(victim.pid)
    assert not [e for e in rig.events if e[0] == "storm"]


def test_permissive_turns_the_storm_guard_off(tmp_path, fake_cgroupfs, procs):
    rig = Rig(tmp_path, permissive=True)
    victim, _ = procs.start("exec sleep 1000")
    h = rig.healer(nonessential_pids=lambda: [victim.pid])
    storm(rig, h, fake_cgroupfs, [0, 10, 20, 30])
    assert alive(victim.pid)
    ev = [d for k, d, _ in rig.events if k == "storm"]
    assert len(ev) == 1 and ev[0]["action"] == "none" and ev[0]["reason"] == "permissive"


def test_storm_guard_in_dry_run_kills_nothing(tmp_path, fake_cgroupfs, procs):
    rig = Rig(tmp_path, dry_run=True)
    victim, _ = procs.start("exec sleep 1000")
    h = rig.healer(nonessential_pids=lambda: [victim.pid])
    storm(rig, h, fake_cgroupfs, [0, 10])
    assert alive(victim.pid)
    ev = [d for k, d, _ in rig.events if k == "storm"]
    assert ev and ev[0]["dry_run"] is True and ev[0]["killed"][0]["pid"] == victim.pid


def test_storm_guard_spares_protected_runs_and_root(rig, fake_cgroupfs, procs):
    run_proc, _ = procs.start("exec sleep 1000")
    root_proc, _ = procs.start("exec sleep 1000", uid=0)
    add_run(rig.registry, run_proc.pid)
    h = rig.healer(nonessential_pids=lambda: [run_proc.pid, root_proc.pid])
    storm(rig, h, fake_cgroupfs, [0, 10])
    assert alive(run_proc.pid) and alive(root_proc.pid)
    ev = [d for k, d, _ in rig.events if k == "storm"][0]
    assert ev["killed"] == []
    assert ev["skipped"] == {
        str(run_proc.pid): "protected: the grace decides",
        str(root_proc.pid): "root's process",
    }


# ---------------------------------------------------------------- livelock


def test_livelock_is_reported_at_once(rig, fake_cgroupfs):
    h = rig.healer()
    for oom in (100, 400, 700):
        write_events(fake_cgroupfs, oom=oom, oom_kill=7)
        rig.clock.advance(0.5)
        h.tick()
    st = h.status()["livelock"]
    assert st["active"] is True and st["since"] == pytest.approx(rig.clock.wall_now)
    ev = [(d, u) for k, d, u in rig.events if k == "oom_livelock"]
    assert len(ev) == 1 and ev[0][0]["state"] == "started" and ev[0][0]["oom_kill"] == 7
    assert rig.gauge("oomguard_healer_livelock", cgroup="/app") == 1.0
    for oom in (1000, 1300):  # still stuck: no second event
        write_events(fake_cgroupfs, oom=oom, oom_kill=7)
        rig.clock.advance(0.5)
        h.tick()
    assert len([e for e in rig.events if e[0] == "oom_livelock"]) == 1
    write_events(fake_cgroupfs, oom=1300, oom_kill=7)  # oom stops climbing
    rig.clock.advance(0.5)
    h.tick()
    ev = [d for k, d, _ in rig.events if k == "oom_livelock"]
    assert [d["state"] for d in ev] == ["started", "ended"]
    assert h.status()["livelock"]["active"] is False
    assert rig.gauge("oomguard_healer_livelock", cgroup="/app") == 0.0


def test_ooms_with_kills_are_not_a_livelock(rig, fake_cgroupfs):
    h = rig.healer()
    for n in (1, 2, 3, 4):
        write_events(fake_cgroupfs, oom=n, oom_kill=n)
        rig.clock.advance(1.0)
        h.tick()
    assert not [e for e in rig.events if e[0] == "oom_livelock"]
    assert h.status()["livelock"]["active"] is False


def test_livelock_tells_the_run_owners(rig, fake_cgroupfs, procs):
    p, _ = procs.start("exec sleep 1000")
    add_run(rig.registry, p.pid)
    h = rig.healer()
    for oom in (1, 5, 9):
        write_events(fake_cgroupfs, oom=oom, oom_kill=0)
        rig.clock.advance(0.5)
        h.tick()
    (data, uids) = [(d, u) for k, d, u in rig.events if k == "oom_livelock"][0]
    assert uids == [NOBODY] and len(data["runs"]) == 1


def test_livelock_does_not_shorten_the_grace(rig, fake_cgroupfs, procs):
    p, _ = procs.start("exec sleep 1000")
    add_run(rig.registry, p.pid)
    h = rig.healer()
    first_fail = down_at(rig, h)
    oom = 0
    for _ in range(170):
        oom += 600
        write_events(fake_cgroupfs, oom=oom, oom_kill=3)
        rig.clock.advance(1.0)
        h.tick()
    assert h.status()["livelock"]["active"] is True
    assert rig.actions("term") == [] and alive(p.pid)
    while rig.clock.boot < first_fail + 180:
        rig.clock.advance(1.0)
        h.tick()
    assert rig.actions("term")


# ---------------------------------------------------------------- status, state, loop


def test_status_is_json_safe_and_complete(rig):
    import json

    h = rig.healer()
    down_at(rig, h)
    rig.step(h, 5)
    st = json.loads(json.dumps(h.status()))
    assert st["checks"]["shop"]["down"] is True and st["checks"]["shop"]["failures"] == 2
    assert st["phase"] == "waiting"
    assert st["time_left"] == pytest.approx(175.0)
    assert st["acts_at"] == pytest.approx(rig.clock.wall_now + 175.0)
    assert st["last_actions"][-1]["action"] == "down"
    assert {"livelock", "storm", "loop", "window", "grace", "down_since", "restart_tries"} <= set(
        st
    )


def test_state_file_is_written_atomically_and_read_back(rig):
    h = rig.healer()
    down_at(rig, h)
    rig.step(h, 5)
    data = state.read_json(rig.tmp / "healer.json")
    assert data["incident"]["boot_id"] == BOOT
    assert data["incident"]["start"] == h.incident.start
    assert not [p for p in rig.tmp.iterdir() if p.name.endswith(".tmp")]


def test_a_broken_event_store_does_not_stop_the_healer(rig):
    def broken(kind, data, uids):
        raise OSError("disk full")

    h = healer.Healer(
        rig.config, rig.registry, rig.tmp / "healer.json", broken, clock=rig.clock, boot_id=BOOT,
        monitor=health.HealthMonitor(rig.config.healer.checks, rig.probe, threaded=False),
        background=False, processes=lambda: [], run_command=rig.run_command,
    )  # fmt: skip
    down_at(rig, h)
    rig.step(h, 185)
    assert rig.restarts


def test_the_loop_keeps_its_cadence_with_hung_endpoints(tmp_path):
    """Real clock, real threads: the shop's HTTP endpoint accepts and never
    answers, the database greeting never comes, a command check sleeps
    forever. The loop must keep ticking and see the shop go down."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    addr = f"127.0.0.1:{silent.getsockname()[1]}"
    held = []
    stop_accept = threading.Event()

    def accept():
        silent.settimeout(0.1)
        while not stop_accept.is_set():
            try:
                held.append(silent.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    pids = tmp_path / "slow.pids"
    checks = (
        Check("shop", "http", f"http://{addr}/", interval=0.2, timeout=0.3, failures=2),
        Check("db", "mysql", addr, interval=0.2, timeout=0.3, failures=2),
        Check("cron", "command", "sleep 1000", interval=0.2, timeout=0.3, failures=2),
        # still running when the loop stops: run() must abort it, not leave it
        Check("slow", "command", f"sh -c 'echo $$ >> {pids}; exec sleep 1000'", timeout=600.0),
    )
    config = Config(
        healer=HealerConfig(checks=checks, grace=3600.0), layout=LayoutConfig(app_cgroup="app")
    )
    registry = RunRegistry(tmp_path / "runs.json", boot_id=procfs.boot_id())
    events = []
    h = healer.Healer(
        config, registry, tmp_path / "healer.json", lambda k, d, u: events.append((k, d)),
        monitor=health.HealthMonitor(checks, slack=0.2), processes=lambda: [], tick_interval=0.05,
    )  # fmt: skip
    stop = threading.Event()
    t = threading.Thread(target=h.run, args=(stop,), daemon=True)
    t0 = time.monotonic()
    t.start()
    time.sleep(2.5)
    stop.set()
    t.join(5)
    elapsed = time.monotonic() - t0
    stop_accept.set()
    for c in held:
        c.close()
    silent.close()
    assert not t.is_alive()
    # run() aborted the probes on its way out: no check command outlives it
    started = [int(x) for x in pids.read_text().split()]
    assert started
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in started):
        assert time.monotonic() < deadline, "a check's command outlived the healer loop"
        time.sleep(0.02)
    st = h.status()
    # 0.05 s between ticks: ~50 ticks in 2.5 s; a probe awaited would cost 0.3 s each
    assert st["loop"]["ticks"] >= elapsed / 0.05 / 3, st["loop"]
    assert st["loop"]["max_tick_seconds"] < 0.5, st["loop"]
    assert st["phase"] == "waiting" and st["down_since"] is not None
    assert set(st["checks"]) == {"shop", "db", "cron", "slow"}
    assert all(st["checks"][c]["down"] for c in ("shop", "db", "cron")), st["checks"]
