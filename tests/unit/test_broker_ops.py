"""The daemon's socket ops through a real broker: events in bounded pages
with a cursor, the CLI paging through them, other users' runs, commands and
cgroups kept out of what a non-root user sees, status computed once for
many askers, and bad fields refused with a clear error."""

from __future__ import annotations

import time

import pytest
from broker_rig import NOBODY, Rig, ask, ask_as_nobody, in_process_daemon

from oomguard.cli import client
from oomguard.daemon import Daemon
from oomguard.forensics.events import MAX_PAGE

OTHER = 1000
T0 = time.time() - 86_400  # recent: older events are pruned


@pytest.fixture
def daemon(rig: Rig):
    d = in_process_daemon(rig)
    yield d
    d.event_reader.close()
    d.store.close()


def seed_kill(d: Daemon) -> None:
    """One OOM kill of OTHER's process while both users had runs alive."""
    d.store.add("oom_kill", {
        "victim_pid": 4242, "victim_comm": "secret-import", "victim_uid": OTHER,
        "task_memcg": "/user.slice/user-1000.slice/oomguard-run-1", "oom_memcg": "/oomguard.app",
        "protected_runs": [{"id": 1, "uid": OTHER, "user": "shop", "command": "mysqldump --password=hunter2"},
                           {"id": 2, "uid": NOBODY, "user": "nobody", "command": "sleep 300"}],
    }, uids=[OTHER, NOBODY])  # fmt: skip


def test_events_come_in_bounded_pages_and_the_cursor_walks_back(daemon: Daemon) -> None:
    for n in range(1234):
        daemon.store.add("policy", {"n": n}, ts=T0 + n // 3, uids=[0])  # equal timestamps too
    path = daemon.cfg.protect.socket
    first = ask(path, {"op": "events", "limit": 100_000, "page": MAX_PAGE})
    assert [e["data"]["n"] for e in first["events"]] == list(range(734, 1234))
    assert first["next"] == [first["events"][0]["ts"], first["events"][0]["id"]]
    default = ask(path, {"op": "events"})
    assert len(default["events"]) == 100  # the default page
    seen, cursor = [], None
    while True:
        reply = ask(path, {"op": "events", "limit": 100_000, "page": 300, "before": cursor})
        seen = reply["events"] + seen
        cursor = reply["next"]
        if cursor is None:
            break
    assert [e["data"]["n"] for e in seen] == list(range(1234))  # each once, in order
    assert daemon.event_reader.started == 1  # every page came from the one reader process
    assert ask(path, {"op": "events", "page": MAX_PAGE + 1})["error"] == "page must be an integer from 1 to 500"


def test_the_cli_client_pages_through_to_its_limit(daemon: Daemon) -> None:
    for n in range(1200):
        daemon.store.add("policy", {"n": n}, ts=T0 + n, uids=[0])
    path = daemon.cfg.protect.socket
    rows = client.events(path, limit=1000)
    assert [e["data"]["n"] for e in rows] == list(range(200, 1200))  # the newest 1000, oldest first
    assert [e["data"]["n"] for e in client.events(path, limit=3, kinds=["policy"])] == [1197, 1198, 1199]
    assert client.events(path, limit=10, kinds=["grant"]) == []


def test_a_page_of_huge_events_is_cut_to_the_reply_bound(daemon: Daemon) -> None:
    for n in range(30):
        daemon.store.add("policy", {"n": n, "blob": "x" * 100_000}, ts=T0 + n, uids=[0])
    reply = ask(daemon.cfg.protect.socket, {"op": "events", "page": 30})
    assert 0 < len(reply["events"]) < 30 and reply["next"] == [reply["events"][0]["ts"], reply["events"][0]["id"]]
    rows = client.events(daemon.cfg.protect.socket, limit=30)
    assert [e["data"]["n"] for e in rows] == list(range(30))  # nothing lost across the cut


def test_another_users_runs_commands_and_cgroups_are_kept_out_of_events(daemon: Daemon) -> None:
    seed_kill(daemon)
    daemon.store.add("grant", {"id": 1, "uid": OTHER, "command": "mysqldump --password=hunter2"}, uids=[OTHER])
    mine = ask_as_nobody(daemon.cfg.protect.socket, {"op": "events"})["events"]
    text = repr(mine)
    assert len(mine) == 1 and mine[0]["kind"] == "oom_kill"  # OTHER's grant is not named for nobody
    assert "hunter2" not in text and "secret-import" not in text and "user-1000" not in text
    assert mine[0]["data"]["victim"] == "another user's process" and mine[0]["uids"] == [NOBODY]
    assert [r["id"] for r in mine[0]["data"]["protected_runs"]] == [2]
    root = ask(daemon.cfg.protect.socket, {"op": "events"})["events"]
    assert "hunter2" in repr(root)  # root sees it all


def test_status_shows_a_user_only_their_own_part(daemon: Daemon) -> None:
    seed_kill(daemon)
    status = ask_as_nobody(daemon.cfg.protect.socket, {"op": "status"})
    assert status["ok"] and all(p["uid"] == NOBODY for p in status["protected"])
    kills = status["last_oom_kills"]
    assert len(kills) == 1 and "hunter2" not in repr(status) and "user-1000" not in repr(status)
    assert "last_actions" not in status["healer"] and "killed_runs" not in status["healer"]


def test_many_status_askers_cost_one_scan(daemon: Daemon, monkeypatch) -> None:
    scans = []
    real = daemon.ops._status_snapshot
    now = [100.0]
    monkeypatch.setattr(daemon.ops.status_view, "compute", lambda: scans.append(1) or real())
    monkeypatch.setattr(daemon.ops.status_view, "clock", lambda: now[0])
    path = daemon.cfg.protect.socket
    replies = [ask(path, {"op": "status"}) for _ in range(3)] + [ask_as_nobody(path, {"op": "status"})]
    assert all(r["ok"] for r in replies) and len(scans) == 1  # within the cache's second
    now[0] += 1.0
    assert ask(path, {"op": "status"})["ok"] and len(scans) == 2  # then a fresh one


@pytest.mark.parametrize("request_, error", [
    ({"op": "events", "since": 10**4000}, "since must be a number"),
    ({"op": "events", "since": -(10**30)}, "since must be a number"),
    ({"op": "events", "before": [1e308, 1]}, "before must be the [ts, id] pair"),
    ({"op": "events", "before": [1, 2**64]}, "before must be the [ts, id] pair"),
    ({"op": "events", "before": "x"}, "before must be the [ts, id] pair"),
    ({"op": "events", "kinds": ["x" * 65]}, "kinds must be a list of strings"),
    ({"op": "events", "kinds": ["grant"] * 65}, "kinds must be a list of strings"),
    ({"op": "kill-run", "id": 10**4000}, "kill-run needs an integer id"),
    ({"op": "runs", "all": "yes"}, "all must be true or false"),
    ({"op": "protect", "v": 10**100}, "protect: v must be a small integer"),
])  # fmt: skip
def test_out_of_range_fields_are_refused_clearly(daemon: Daemon, request_, error) -> None:
    reply = ask(daemon.cfg.protect.socket, request_)
    assert reply["ok"] is False and error in reply["error"] and "internal error" not in reply["error"]


def test_nan_and_infinity_are_malformed(daemon: Daemon) -> None:
    for raw in (b'{"op": "events", "since": Infinity}\n', b'{"op": "events", "since": -Infinity}\n'):
        assert "malformed request" in ask(daemon.cfg.protect.socket, raw)["error"]
    assert ask(daemon.cfg.protect.socket, {"op": "events", "since": 1e300})["ok"] is False

