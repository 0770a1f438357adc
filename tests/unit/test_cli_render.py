"""The CLI's human output: `oomguard status`, `events` and the table helper,
fed with dicts shaped like the daemon's replies."""

from __future__ import annotations

import json
import time

import pytest

from oomguard.cli import commands as cli
from oomguard.cli import render

MiB = 1 << 20
KILL_TS = 1_795_928_345.5


def stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def oom_event(**data) -> dict:
    base = {
        "constraint": "CONSTRAINT_MEMCG",
        "oom_memcg": "/oomguard.app",
        "task_memcg": "/oomguard.app/php-fpm",
        "victim_pid": 4242,
        "victim_comm": "php-fpm8.2",
        "victim_uid": 1001,
        "total_vm_kb": 312_000,
        "anon_rss_kb": 181_244,
        "file_rss_kb": 0,
        "shmem_rss_kb": 12,
        "oom_score_adj": 0,
        "complete": True,
        "protected_runs": [],
    }
    return {"id": 7, "ts": KILL_TS, "kind": "oom_kill", "uids": [1001], "data": {**base, **data}}


def status_reply(**over) -> dict:
    """What op_status answers root (cli pops "ok")."""
    d = {
        "memory": {"total": 1024 * MiB, "available": 300 * MiB, "swap_total": 0, "swap_free": 0},
        "pressure": {"some_avg10": 12.5, "full_avg10": 3.25},
        "app": {"cgroup": "/oomguard.app", "current": 400 * MiB, "max": 448 * MiB, "oom": 3, "oom_kill": 2,
                "pressure": {"some_avg10": 20.0, "full_avg10": 5.0}},
        "protected": [{"pid": 900, "uid": 1001, "comm": "php", "rss_kb": 90_000, "cgroup": "/oomguard.app/oomguard-run-3"},
                      {"pid": 901, "uid": 1001, "comm": "sh", "rss_kb": 900, "cgroup": "/oomguard.app/oomguard-run-3"}],
        "runs": [{"id": 3, "user": "shopuser", "uid": 1001, "pid": 900, "command": "php bin/magento import:products big.csv",
                  "cgroup": "/oomguard.app/oomguard-run-3", "tty": None, "started": KILL_TS - 60, "ended": None,
                  "exit_status": None, "peak_memory": None, "end_reason": None}],
        "healer": {
            "enabled": True, "dry_run": False, "permissive": False, "timezone": "UTC", "phase": "waiting",
            "checks": {
                "shop": {"kind": "http", "target": "http://127.0.0.1/", "healthy": False, "down": True,
                         "failures": 4, "threshold": 2, "detail": "HTTP 502"},
                "db": {"kind": "mysql", "target": "/run/mysqld/mysqld.sock", "healthy": True, "down": False,
                       "failures": 0, "threshold": 2, "detail": None},
                "cron": {"kind": "command", "target": "true", "healthy": False, "down": False,
                         "failures": 1, "threshold": 2, "detail": "exit 1"},
            },
            "down_since": KILL_TS - 33, "restart_tries": 0, "killed_runs": [],
            "window": "default", "grace": 180.0, "down": True, "downtime": 33.4, "time_left": 146.6,
            "acts_at": KILL_TS + 146.6,
            "livelock": {"active": False, "since": None, "oom_per_second": 0.0},
            "storm": {"active": False, "kills_per_second": 0.0, "threshold": 5.0},
            "loop": {"ticks": 10, "interval": 0.5, "last_tick_seconds": 0.001, "max_tick_seconds": 0.01},
            "last_actions": [],
        },
        "last_oom_kills": [oom_event(protected_runs=[{"id": 3, "user": "shopuser", "uid": 1001, "command": "php"}])],
        "daemon": {"pid": 321, "process_events": "events", "config": "/etc/oomguard/oomguard.toml"},
    }
    d.update(over)
    return d


# ---------------------------------------------------------------- render_status


def test_status_with_a_daemon_shows_every_part():
    text = cli.render_status(status_reply())
    lines = text.splitlines()
    assert lines[0] == "memory      300 MiB available of 1024 MiB"
    assert lines[1] == "app slice   /oomguard.app: 400 MiB of 448 MiB, oom=3 oom_kill=2"
    assert lines[2] == "pressure    memory some 12.50% full 3.25% (avg10)"
    assert lines[3] == "daemon      pid 321, process events: events"
    assert lines[4] == "protected   2 process(es) at -1000"
    assert lines[5] == "  run 3    shopuser   pid 900     php bin/magento import:products big.csv"
    # a check is "down" past its threshold, "failing" when its last probe failed below it
    assert "check       shop: down HTTP 502" in lines
    assert "check       cron: failing exit 1" in lines
    assert "healer      waiting, window default (grace 3m00s), down for 33s, acts in 2m26s" in lines
    assert "oom kills   1 recent" in lines
    assert lines[-1] == f"  {stamp(KILL_TS)}  pid 4242 php-fpm8.2 (uid 1001) in /oomguard.app"
    assert not any(line != line.rstrip() for line in lines)


def test_status_shows_a_passing_check_as_up():
    lines = cli.render_status(status_reply()).splitlines()
    assert "check       db: up" in lines  # healthy: True, down: False, detail None


def test_status_when_the_daemon_is_not_reachable():
    """What cmd_status renders from status.collect() when the socket is gone."""
    d = {
        "memory": {"total": 2048 * MiB, "available": 1024 * MiB, "swap_total": 0, "swap_free": 0},
        "pressure": None,
        "app": {"cgroup": None},
        "daemon": None,
        "daemon_error": "the oomguard daemon is not running (no socket at /run/oomguard/protect.sock)",
    }
    assert cli.render_status(d).splitlines() == [
        "memory      1024 MiB available of 2048 MiB",
        "app slice   none (run `oomguard setup`)",
        "daemon      not reachable: the oomguard daemon is not running (no socket at /run/oomguard/protect.sock)",
    ]


def test_status_app_without_limit_quiet_healer_dry_run_and_livelock():
    healer = {"phase": "watching", "checks": {}, "window": "23:00-07:00", "grace": 900.0, "down": False,
              "time_left": None, "dry_run": True,
              "livelock": {"active": True, "since": KILL_TS, "oom_per_second": 40.0}}
    d = status_reply(app={"cgroup": "/oomguard.app", "current": 10 * MiB, "max": None, "oom": 0, "oom_kill": 0},
                     pressure=None, protected=[], runs=[], healer=healer, last_oom_kills=[])
    lines = cli.render_status(d).splitlines()
    assert "app slice   /oomguard.app: 10 MiB of no limit, oom=0 oom_kill=0" in lines
    assert not any(line.startswith("pressure") for line in lines)
    assert "protected   0 process(es) at -1000" in lines
    assert "healer      watching, window 23:00-07:00 (grace 15m00s) [dry run]" in lines
    assert any(line.startswith("livelock    only unkillable tasks left") for line in lines)
    assert lines[-1] == "oom kills   0 recent"


def test_status_of_an_incomplete_kill_and_a_long_command():
    """An OOM report cut short has no memcg; a long command is cut at 60."""
    run = dict(status_reply()["runs"][0], command="php " + "x" * 200)
    kill = oom_event(oom_memcg=None, victim_comm="import", victim_uid=1001, complete=False)
    lines = cli.render_status(status_reply(runs=[run], last_oom_kills=[kill])).splitlines()
    assert lines[-1].endswith("pid 4242 import (uid 1001) in -")
    run_line = next(line for line in lines if line.startswith("  run 3"))
    assert run_line.endswith("php " + "x" * 56) and len(run_line.split("pid 900")[1].strip()) == 60


def test_status_for_a_healer_that_has_no_window_yet():
    d = status_reply(healer={}, last_oom_kills=[], runs=[])
    assert "healer      -" in cli.render_status(d).splitlines()


# ---------------------------------------------------------------- describe_event


def test_oom_kill_names_the_protected_runs_alive():
    e = oom_event(protected_runs=[{"id": 3, "user": "shopuser", "uid": 1001, "command": "php import.php"},
                                  {"id": 5, "user": "otheruser", "uid": 1002, "command": "sleep 1"}])
    assert cli.describe_event(e) == (
        "killed pid 4242 php-fpm8.2 uid 1001 anon 181244 kB in /oomguard.app; "
        "protected runs alive: 3 (shopuser), 5 (otheruser)"
    )


def test_oom_kill_without_attribution_or_memcg():
    e = oom_event(protected_runs=[], oom_memcg=None, constraint="CONSTRAINT_NONE")
    assert cli.describe_event(e) == "killed pid 4242 php-fpm8.2 uid 1001 anon 181244 kB in -"
    e["data"].pop("protected_runs")  # stored before attribution existed
    assert "protected runs" not in cli.describe_event(e)


def test_grant_and_run_end():
    run = {"id": 12, "user": "shopuser", "uid": 1001, "pid": 777, "command": "php bin/magento " + "y" * 100,
           "cgroup": "/user.slice/oomguard-run-12.scope", "started": KILL_TS, "ended": None,
           "exit_status": None, "end_reason": None}
    grant = cli.describe_event({"kind": "grant", "ts": KILL_TS, "data": run})
    assert grant == "run 12 shopuser pid 777: " + ("php bin/magento " + "y" * 100)[:60]
    ended = dict(run, ended=KILL_TS + 5, exit_status=-9, end_reason="killed by healer")
    assert cli.describe_event({"kind": "run_end", "ts": KILL_TS, "data": ended}).endswith(
        " exit -9 (killed by healer)")


def test_refusal_policy_and_healer_events():
    refusal = {"uid": 1002, "user": "otheruser", "pid": 55, "reason": "not_allowed",
               "message": "user otheruser (uid 1002) is not in [protect] allow_users or allow_groups"}
    assert cli.describe_event({"kind": "refusal", "data": refusal}) == (
        "otheruser pid 55: user otheruser (uid 1002) is not in [protect] allow_users or allow_groups")
    change = {"pid": 99, "comm": "mariadbd", "old": 0, "new": -900, "class_name": "database"}
    assert cli.describe_event({"kind": "policy", "data": change}) == "pid 99 mariadbd: 0 -> -900 (database)"
    assert cli.describe_event({"kind": "healer", "data": {"kind": "healer", "action": "down"}}) == "down"
    long = {"action": "killed", "message": "m" * 300}
    assert cli.describe_event({"kind": "storm", "data": long}) == "m" * 120
    assert cli.describe_event({"kind": "oom_livelock", "data": {"oom_memcg": "/x"}}) == ""


# ---------------------------------------------------------------- table


def test_table_aligns_columns_and_strips_trailing_space():
    out = cli.table([(1, "shopuser", None, "php import.php"), (12345, "u", 0, "")],
                    ("RUN", "USER", "EXIT", "COMMAND"))
    assert out.splitlines() == [
        "RUN    USER      EXIT  COMMAND",
        "1      shopuser        php import.php",
        "12345  u         0",
    ]


def test_table_with_no_rows_is_the_header():
    assert cli.table([], ("TIME", "KIND", "WHAT")) == "TIME  KIND  WHAT"


def test_events_table_as_cmd_events_builds_it():
    rows = [oom_event(protected_runs=[{"id": 3, "user": "shopuser"}]),
            {"id": 8, "ts": KILL_TS + 1, "kind": "healer", "data": {"action": "down"}}]
    out = cli.table([(cli.ago(e["ts"]), e["kind"], cli.describe_event(e)) for e in rows], ("TIME", "KIND", "WHAT"))
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "KIND", "WHAT"]
    assert lines[1].startswith(f"{stamp(KILL_TS)}  oom_kill  killed pid 4242")
    assert lines[1].endswith("protected runs alive: 3 (shopuser)")
    assert lines[2] == f"{stamp(KILL_TS + 1)}  healer    down"


def test_small_formatters():
    assert render.ago(None) == "-"
    assert render._mib(None) == "-" and render._mib(512 * MiB) == "512 MiB"
    assert [render._dur(s) for s in (None, 0, 59.9, 60, 3725)] == ["-", "0s", "59s", "1m00s", "62m05s"]


# ---------------------------------------------------------------- cmd_status without a daemon


@pytest.mark.parametrize("as_json", [False, True])
def test_status_command_without_a_daemon(tmp_path, monkeypatch, capsys, as_json):
    cfg = tmp_path / "oomguard.toml"
    cfg.write_text(f'[protect]\nsocket = "{tmp_path / "none.sock"}"\n')
    monkeypatch.delenv("OOMGUARD_SOCKET", raising=False)
    rc = cli.main(["--config", str(cfg), "status", *(["--json"] if as_json else [])])
    out = capsys.readouterr().out
    assert rc == 0
    if as_json:
        data = json.loads(out)
        assert data["daemon"] is None and "not running" in data["daemon_error"]
        assert data["memory"]["total"] > 0
    else:
        assert out.splitlines()[-1] == (
            f"daemon      not reachable: the oomguard daemon is not running (no socket at {tmp_path / 'none.sock'})")
