"""The healer's tick with a fake clock: the downtime clock, the windows an outage gets, the whole incident on real processes, dry run, status and the loop's cadence with hung endpoints."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest
from healer_rig import (
    BOOT,
    IGNORES_TERM,
    NOBODY,
    Rig,
    add_run,
    alive,
    at,
    down_at,
    wait_dead,
)

from oomguard.config import (
    Check,
    Config,
    HealerConfig,
    LayoutConfig,
)
from oomguard.healer import healer, health, killer
from oomguard.host import procfs
from oomguard.host import statefile as state
from oomguard.runs.registry import RunRegistry


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
