"""The auto-healer's flagship scenario against the real kernel (issue 4, section 6).

A real shop (nginx -> php-fpm -> MariaDB) runs inside an app cgroup with a
tight memory.max; `oomguard daemon` watches its URL with a grace of a few
seconds; shopuser runs an `oom-protect`ed import in the same cgroup. The
scenario itself lives in flagship.py (demo/story.py plays the same code).

Case A: the import finishes within the grace. Case B: it stalls past it.
Behaviour is asserted; timings are only recorded (/results/flagship.json,
with both timelines) and printed, never asserted beyond generous deadlines.
"""

from __future__ import annotations

import shutil

import pytest
from flagship import APP_USER, CaseResult, Flagship, format_step, write_results

SHOP_COMMS = {"php-fpm8.2", "nginx"}


@pytest.fixture(scope="module")
def flagship(guest_results_dir):
    with Flagship() as fs:
        yield fs
        if fs.daemon is not None:  # for a post-mortem on the host
            shutil.copy(fs.daemon.log, guest_results_dir / "flagship-daemon.log")


def timeline(res: CaseResult) -> str:
    return "\n".join(format_step(s) for s in res.steps)


def record(res: CaseResult, guest_results_dir) -> None:
    write_results(guest_results_dir / "flagship.json", [res])
    print(f"\n{timeline(res)}\nfigures: {res.figures}")


def in_order(actions: list[str], wanted: list[str]) -> bool:
    """``wanted`` occurs in ``actions`` as a subsequence, in this order."""
    it = iter(actions)
    return all(any(a == w for a in it) for w in wanted)


def first_ts(res: CaseResult, kind: str, **match) -> float:
    events = res.events_of(kind, **match)
    assert events, f"no {kind} event {match}\n{timeline(res)}"
    return events[0]["ts"]


def check_common(res: CaseResult) -> None:
    """What holds in both cases."""
    why = f"\n--- timeline ---\n{timeline(res)}"
    assert res.finished, f"the case did not reach its end (shop back after the healer) in time{why}"
    # the import was protected, in its own cgroup under the app cgroup
    assert res.run is not None, f"the daemon has no run for the import (pid {res.import_pid}){why}"
    assert res.run["user"] == APP_USER and res.run["pid"] == res.import_pid
    assert res.run["cgroup"].startswith(res.app_cgroup + "/oomguard-run-"), res.run
    assert "oom_score_adj -1000" in res.import_output[0], res.import_output
    # the kernel chose php-fpm and nginx: never the import, never MariaDB
    victims = {v["pid"]: v for v in res.victims}
    comms = {v["comm"] for v in res.victims}
    assert comms >= SHOP_COMMS, f"expected php-fpm and nginx among the victims: {res.victims}{why}"
    assert comms <= SHOP_COMMS, f"the kernel killed something else: {res.victims}{why}"
    assert res.import_pid not in victims and res.mariadb_pid_before not in victims, res.victims
    assert all(v["oom_score_adj"] != -1000 for v in res.victims), res.victims
    killed = res.memory_events_after.get("oom_kill", 0) - res.memory_events_before.get("oom_kill", 0)
    assert killed >= len(res.victims) > 0, (killed, res.victims)
    for e in res.events_of("oom_kill"):  # oomguard saw the same kills, with the import alive
        if e["data"]["victim_pid"] is not None:  # (see flagship.py: victimless reports in a flood)
            assert e["data"]["victim_comm"] in SHOP_COMMS, e
            assert res.run["id"] in [r["id"] for r in e["data"]["protected_runs"]], e
    # MariaDB: -1000 by the daemon's policy, untouched, same process
    assert res.mariadb_adj == -1000
    assert res.mariadb_pid_after == res.mariadb_pid_before and res.mariadb_alive
    # the healer restarted the services and the shop answers again
    actions = res.healer_actions()
    restart = res.events_of("healer", action="restart")
    assert restart and all(s["ok"] for s in restart[0]["data"]["services"]), restart
    assert {s["service"] for s in restart[0]["data"]["services"]} == {"php-fpm", "nginx"}
    assert "gave_up" not in actions and "kill_failed" not in actions, actions
    assert res.healthy_at_end, f"the shop does not answer at the end{why}"
    assert res.figures["downtime_our_probe"] is not None and res.figures["downtime_daemon"] is not None
    # the loop kept ticking all along (a generous bound, not a timing)
    assert res.healer_status["loop"]["max_tick_seconds"] < 5.0, res.healer_status["loop"]


def test_case_a_the_import_finishes_within_the_grace(flagship, guest_results_dir):
    """The kernel kills php-fpm and nginx for the protected import, which
    finishes (exit 0) within the grace; when the grace expires the healer
    finds no protected run, kills nothing, restarts php-fpm and nginx, and
    the shop answers again."""
    res = flagship.run_case("A")
    record(res, guest_results_dir)
    why = f"\n--- timeline ---\n{timeline(res)}"
    check_common(res)
    assert res.import_status == 0 and res.import_output[-1] == "done", res.import_output
    assert res.run["exit_status"] == 0 and res.run["end_reason"] == "exited", res.run
    # it ended before the grace ran out (that is what makes this case A) ...
    f = res.figures
    assert f["import_ended_at"] < f["grace_expiry_at"], f"the import outlived the grace: {f}{why}"
    # ... so the healer killed nothing, and restarted what was down
    actions = res.healer_actions()
    assert in_order(actions, ["down", "restart"]) and in_order(actions, ["down", "recovered"]), f"{actions}{why}"
    assert not {"term", "killed", "spared_some", "would_kill"} & set(actions), f"{actions}{why}"
    rec = res.events_of("healer", action="recovered")[0]["data"]
    # recovered by the restart: a try had begun (its event is stored once the
    # commands return, which can be just after the first healthy probe)
    assert rec["acted"] is True and rec["restart_tries"] >= 1 and rec["killed_runs"] == [], rec
    assert first_ts(res, "run_end", id=res.run["id"]) < first_ts(res, "healer", action="restart")


def test_case_b_the_import_stalls_past_the_grace(flagship, guest_results_dir):
    """The import keeps asking for more than exists: once only -1000 tasks
    are left it stalls (memory.events oom climbs, oom_kill stays put) and the
    daemon reports the livelock. When the grace expires the healer SIGTERMs
    the run (which ignores it), SIGKILLs the run's own cgroup, restarts the
    services, and the shop answers again; MariaDB is never touched."""
    res = flagship.run_case("B")
    record(res, guest_results_dir)
    why = f"\n--- timeline ---\n{timeline(res)}"
    check_common(res)
    # the livelock, as the cgroup shows it, as the kernel says it, and as oomguard reports it
    assert res.livelock_seen is not None, f"memory.events never showed oom climbing with a flat oom_kill{why}"
    assert res.kmsg_no_killable, "the kernel never said 'Out of memory and no killable processes'"
    livelock = res.events_of("oom_livelock", state="started", cgroup=res.app_cgroup)
    assert livelock, f"the daemon did not report the livelock{why}"
    # the healer: down, SIGTERM, SIGKILL of the run's cgroup, restart, recovered
    actions = res.healer_actions()
    assert in_order(actions, ["down", "term", "killed", "restart"]), f"{actions}{why}"
    assert in_order(actions, ["down", "term", "killed", "recovered"]), f"{actions}{why}"
    assert livelock[0]["ts"] < first_ts(res, "healer", action="term"), "livelock reported only after the kill"
    term = res.events_of("healer", action="term")[0]["data"]
    assert term["run"] == res.run["id"] and res.import_pid in term["pids"], term
    killed = res.events_of("healer", action="killed")[0]["data"]
    assert killed["run"] == res.run["id"] and killed["owner"] == APP_USER, killed
    assert killed["method"] == "cgroup.kill", killed  # it ignored SIGTERM: SIGKILL of its own cgroup
    assert res.import_pid in killed["pids"] and killed["skipped"] == {}, killed
    assert [p for p, state in killed["stalled"]] == [res.import_pid], killed  # stalled, in R or D
    # the import never finished: SIGKILL, recorded as the healer's doing
    assert res.import_status == -9 and "done" not in res.import_output, res.import_output
    assert res.run["end_reason"] == "killed by healer", res.run
    rec = res.events_of("healer", action="recovered")[0]["data"]
    assert rec["acted"] is True and rec["restart_tries"] >= 1, rec
    assert rec["killed_runs"] == [res.run["id"]], rec
    assert first_ts(res, "healer", action="killed") < first_ts(res, "healer", action="restart")
    # the healer loop kept ticking while the cgroup thrashed
    during = [s for s in res.tick_samples if s["livelock"]]
    assert len(during) >= 2 and during[-1]["ticks"] > during[0]["ticks"], res.tick_samples
