"""Tests for oomguard.events: the SQLite event store and --since parsing."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from oomguard.forensics import events
from oomguard.forensics.events import SCHEMA_VERSION, EventStore, StoreError, parse_since

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture
def store(tmp_path: Path):
    s = EventStore(str(tmp_path / "events.db"), max_age=3600, max_rows=1000)
    yield s
    s.close()


def test_add_and_query_round_trip(store: EventStore) -> None:
    i = store.add(
        "oom_kill", {"victim_pid": 42, "victim_comm": "php-fpm"}, ts=1000.0, uids=[1000, 0, 1000]
    )
    (ev,) = store.query()
    assert ev == {
        "id": i,
        "ts": 1000.0,
        "kind": "oom_kill",
        "uids": [0, 1000],
        "data": {"victim_pid": 42, "victim_comm": "php-fpm"},
    }


def test_query_filters_and_order(store: EventStore) -> None:
    for n in range(10):
        store.add("grant" if n % 2 else "refusal", {"n": n}, ts=100.0 + n)
    assert [e["data"]["n"] for e in store.query(since=105)] == [5, 6, 7, 8, 9]
    assert [e["data"]["n"] for e in store.query(kinds=["grant"])] == [1, 3, 5, 7, 9]
    assert store.query(kinds=[]) == []
    # limit keeps the newest, still returned oldest first
    assert [e["data"]["n"] for e in store.query(limit=3)] == [7, 8, 9]
    assert [e["data"]["n"] for e in store.query(since=102, until=104)] == [2, 3]


def test_privacy_non_root_sees_only_events_naming_them(store: EventStore) -> None:
    store.add("run_end", {"who": "alice"}, ts=1, uids=[1000])
    store.add("oom_kill", {"victim": "php-fpm"}, ts=2, uids=[1000, 1001])
    store.add("run_end", {"who": "bob"}, ts=3, uids=[1001])
    store.add("policy", {"change": "x"}, ts=4)  # root only
    assert [e["ts"] for e in store.query(uid=1000)] == [1, 2]
    assert [e["ts"] for e in store.query(uid=1001)] == [2, 3]
    assert store.query(uid=1002) == []
    assert [e["ts"] for e in store.query()] == [1, 2, 3, 4]  # root


def test_schema_is_versioned_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "e.db"
    EventStore(str(path), 60, 100).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    db.close()
    assert path.stat().st_mode & 0o777 == 0o600


def test_migrations_run_in_order_and_only_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "m.db")
    s = EventStore(path, 60, 100)
    s.add("grant", {"a": 1}, ts=1)
    s.close()
    extra = "CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT); INSERT INTO notes (text) VALUES ('v2')"
    monkeypatch.setattr(events, "MIGRATIONS", [*events.MIGRATIONS, extra])
    monkeypatch.setattr(events, "SCHEMA_VERSION", len(events.MIGRATIONS))
    for _ in range(2):
        s = EventStore(path, 60, 100)
        assert s.schema_version == SCHEMA_VERSION + 1
        assert [e["data"] for e in s.query()] == [{"a": 1}]  # old data kept
        s.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT text FROM notes").fetchall() == [("v2",)]  # ran once


def test_failed_migration_leaves_the_old_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "f.db")
    EventStore(path, 60, 100).close()
    monkeypatch.setattr(
        events,
        "MIGRATIONS",
        [*events.MIGRATIONS, "CREATE TABLE t (x); SELECT nonsense FROM nowhere"],
    )
    monkeypatch.setattr(events, "SCHEMA_VERSION", len(events.MIGRATIONS))
    with pytest.raises(StoreError):
        EventStore(path, 60, 100)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("SELECT name FROM sqlite_master WHERE name = 't'").fetchall() == []


def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    db.close()
    with pytest.raises(StoreError, match="newer"):
        EventStore(str(path), 60, 100)


def test_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError):
        EventStore(str(path), 60, 100)


def test_prune_by_age_and_rows(tmp_path: Path) -> None:
    s = EventStore(str(tmp_path / "p.db"), max_age=100, max_rows=5, prune_every=0)
    for n in range(10):
        s.add("healer", {"n": n}, ts=1000.0 + n, uids=[7])
    assert s.prune(now=1105.0) == 5  # by rows: 10 -> 5 (all younger than 100 s)
    assert [e["data"]["n"] for e in s.query()] == [5, 6, 7, 8, 9]
    assert s.prune(now=1107.5) == 3  # by age: ts < 1007.5 goes
    assert [e["data"]["n"] for e in s.query()] == [8, 9]
    assert [e["data"]["n"] for e in s.query(uid=7)] == [8, 9]  # uid rows went with them
    db = sqlite3.connect(tmp_path / "p.db")
    assert db.execute("SELECT COUNT(*) FROM event_uids").fetchone()[0] == 2
    s.close()


def test_add_prunes_by_itself(tmp_path: Path) -> None:
    s = EventStore(str(tmp_path / "a.db"), max_age=1e9, max_rows=100, prune_every=50)
    for n in range(260):
        s.add("storm", {"n": n})
    assert s.count() <= 150  # never more than max_rows + prune_every
    assert s.query(limit=1)[0]["data"]["n"] == 259
    s.close()


def test_state_and_atomic_event_plus_state(store: EventStore) -> None:
    assert store.get_state("kmsg.seq") is None
    store.set_state("kmsg.seq", "10")
    store.set_state("kmsg.seq", "11")
    assert store.get_state("kmsg.seq") == "11"
    store.add("oom_kill", {"pid": 1}, state={"kmsg.seq": "42", "kmsg.boot_id": "abc"})
    assert (store.get_state("kmsg.seq"), store.get_state("kmsg.boot_id")) == ("42", "abc")


def test_a_failing_add_writes_nothing(store: EventStore) -> None:
    class Boom(Exception):
        pass

    class BadValue:
        def __str__(self) -> str:
            raise Boom

    store.set_state("k", "before")
    with pytest.raises(Boom):
        store.add("policy", {"x": 1}, state={"k": BadValue()})  # type: ignore[dict-item]
    assert store.query() == [] and store.get_state("k") == "before"
    with pytest.raises(ValueError):
        store.add("", {})


def test_thread_safety(store: EventStore) -> None:
    def writer(k: int) -> None:
        for n in range(50):
            store.add("grant", {"k": k, "n": n}, uids=[k])

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.count() == 400
    assert len(store.query(uid=3)) == 50
    assert store.integrity_check() == "ok"


def test_data_that_json_cannot_hold_is_stringified(store: EventStore) -> None:
    store.add("healer", {"path": Path("/x"), "when": datetime(2024, 1, 2)})
    assert store.query()[0]["data"] == {"path": "/x", "when": "2024-01-02 00:00:00"}


# ---------------------------------------------------------------- crash safety

_WRITER = r"""
import os, sys, time
sys.path.insert(0, sys.argv[2])
from oomguard.forensics.events import EventStore
s = EventStore(sys.argv[1], max_age=1e9, max_rows=10**9, prune_every=0)
out = os.fdopen(1, "w", buffering=1)
i = 0
while True:
    eid = s.add("oom_kill", {"i": i, "pad": "x" * (i % 3000)}, uids=[1000 + i % 3],
                state={"kmsg.seq": str(i)})
    out.write(f"{eid} {i}\n")   # only after the commit returned
    i += 1
"""


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.5, 1.0])
def test_sigkill_at_any_moment_loses_no_committed_event(tmp_path: Path, delay: float) -> None:
    path = str(tmp_path / "crash.db")
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, path, SRC],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    committed: dict[int, int] = {}
    deadline = time.monotonic() + delay
    first = proc.stdout.readline()  # the store is open and writing
    assert first, proc.stderr.read() if proc.stderr else ""
    eid, i = map(int, first.split())
    committed[eid] = i
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        eid, i = map(int, line.split())
        committed[eid] = i
    os.kill(proc.pid, signal.SIGKILL)
    for line in proc.stdout:  # lines written before the kill landed
        if line.strip():
            eid, i = map(int, line.split())
            committed[eid] = i
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    s = EventStore(path, max_age=1e9, max_rows=10**9)
    assert s.integrity_check() == "ok"
    stored = {e["id"]: e["data"]["i"] for e in s.query(limit=10**9)}
    missing = {k: v for k, v in committed.items() if stored.get(k) != v}
    assert not missing, f"{len(missing)} committed events lost"
    # At most the one in flight is there beyond what was reported.
    assert len(stored) - len(committed) in (0, 1)
    # The state written with the last event is consistent with the events.
    assert int(s.get_state("kmsg.seq") or -1) == max(stored.values())
    # Ids and sequence are gap-free: a torn transaction would leave a hole.
    assert sorted(stored.values()) == list(range(len(stored)))
    s.close()


# ---------------------------------------------------------------- parse_since


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("3m", 180), ("1h", 3600), ("2d", 172800), ("45", 45)]
)
def test_parse_since_durations(text: str, seconds: float) -> None:
    assert parse_since(text, now=1_000_000.0) == 1_000_000.0 - seconds


def test_parse_since_iso() -> None:
    assert (
        parse_since("2024-05-01T13:00:00+02:00") == datetime(2024, 5, 1, 11, tzinfo=UTC).timestamp()
    )
    assert parse_since("2024-05-01T11:00:00Z") == datetime(2024, 5, 1, 11, tzinfo=UTC).timestamp()
    local = datetime(2024, 5, 1, 13, 30)
    assert parse_since("2024-05-01 13:30") == local.timestamp()
    assert parse_since("2024-05-01") == datetime(2024, 5, 1).timestamp()


@pytest.mark.parametrize("text", ["", "yesterday", "1y", "-5m", "2024-13-45", "h1"])
def test_parse_since_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="--since"):
        parse_since(text)


def test_parse_since_is_a_usable_cutoff(store: EventStore) -> None:
    now = time.time()
    store.add("grant", {"n": "old"}, ts=now - 7200)
    store.add("grant", {"n": "new"}, ts=now - 60)
    assert [e["data"]["n"] for e in store.query(since=parse_since("1h"))] == ["new"]
    iso = (datetime.now() - timedelta(hours=3)).isoformat(timespec="seconds")
    assert [e["data"]["n"] for e in store.query(since=parse_since(iso))] == ["old", "new"]


def test_kinds_constant_names_the_documented_kinds() -> None:
    assert set(events.KINDS) == {
        "oom_kill",
        "oom_report",
        "oom_livelock",
        "grant",
        "refusal",
        "run_end",
        "healer",
        "policy",
        "storm",
        "warning",
        "setting",
    }
    assert json.loads(json.dumps(events.KINDS))  # plain strings


def test_refusals_of_one_uid_and_reason_share_a_row_within_the_window(store: EventStore) -> None:
    for n in range(5):
        store.add("refusal", {"uid": 1001, "reason": "not_allowed", "pid": 100 + n}, ts=10.0 + n, uids=[1001])
    store.add("refusal", {"uid": 1001, "reason": "gone", "pid": 200}, ts=12.0, uids=[1001])
    store.add("refusal", {"uid": 1002, "reason": "not_allowed", "pid": 300}, ts=12.0, uids=[1002])
    mine = store.query(uid=1001)
    assert [(e["data"]["reason"], e["data"]["count"]) for e in mine] == [("not_allowed", 5), ("gone", 1)]
    first = mine[0]
    assert first["ts"] == 10.0 and first["data"]["last_ts"] == 14.0
    assert first["data"]["pid"] == 104  # the latest repeat's details
    assert [e["data"]["count"] for e in store.query(uid=1002)] == [1]
    # Past the window a new row opens.
    store.add("refusal", {"uid": 1001, "reason": "not_allowed", "pid": 400},
              ts=10.0 + events.COALESCE_WINDOW + 5, uids=[1001])  # fmt: skip
    assert [e["data"]["count"] for e in store.query(uid=1001, kinds=["refusal"])] == [5, 1, 1]


def test_a_refusal_flood_does_not_evict_another_users_grant(tmp_path: Path) -> None:
    s = EventStore(str(tmp_path / "flood.db"), max_age=1e9, max_rows=50, prune_every=0)
    s.add("grant", {"id": 1, "uid": 1002}, ts=1.0, uids=[1002])
    s.add("oom_kill", {"victim_pid": 9}, ts=1.5)
    reasons = ["not_allowed", "gone", "identity"]
    for n in range(1200):
        s.add("refusal", {"uid": 1001, "reason": reasons[n % 3], "pid": n}, ts=2.0 + n, uids=[1001])
    s.prune(now=2000.0)
    assert [e["data"]["id"] for e in s.query(uid=1002)] == [1]
    assert [e["data"]["victim_pid"] for e in s.query(kinds=["oom_kill"])] == [9]
    refusals = s.query(kinds=["refusal"], limit=10_000)
    assert len(refusals) <= 50  # coalesced, then bounded in their own class
    assert refusals[-1]["data"]["pid"] == 1199  # the newest survives
    s.close()


def test_each_retention_class_is_bounded_on_its_own(tmp_path: Path) -> None:
    s = EventStore(str(tmp_path / "classes.db"), max_age=1e9, max_rows=3, prune_every=0)
    kinds = ["oom_kill", "grant", "healer", "policy"]
    for n in range(10):
        for k in kinds:
            s.add(k, {"n": n}, ts=float(n))
    s.prune(now=100.0)
    for k in kinds:
        assert [e["data"]["n"] for e in s.query(kinds=[k])] == [7, 8, 9], k
    s.close()


def test_a_version_1_database_is_upgraded_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "v1.db")
    with monkeypatch.context() as m:
        m.setattr(events, "MIGRATIONS", events.MIGRATIONS[:1])
        m.setattr(events, "SCHEMA_VERSION", 1)
        EventStore(path, 60, 100).close()
    db = sqlite3.connect(path)  # a row as version 1 wrote it
    db.execute("INSERT INTO events (id, ts, kind, data) VALUES (1, 1.0, 'grant', '{\"id\":7}')")
    db.execute("INSERT INTO event_uids (uid, event_id) VALUES (1001, 1)")
    db.commit()
    db.close()
    with EventStore(path, 1e9, 100) as s:
        assert s.schema_version == SCHEMA_VERSION
        assert [e["data"] for e in s.query(uid=1001)] == [{"id": 7}]
        for n in range(3):
            s.add("refusal", {"uid": 1001, "reason": "busy"}, ts=2.0 + n, uids=[1001])
        assert [e["data"].get("count") for e in s.query(uid=1001)] == [None, 3]


def test_a_full_database_raises_its_own_error_and_stays_usable(store: EventStore) -> None:
    store.add("grant", {"n": 0})
    (pages,) = store._db.execute("PRAGMA page_count").fetchone()
    store._db.execute(f"PRAGMA max_page_count = {pages}")  # real SQLITE_FULL
    with pytest.raises(sqlite3.OperationalError, match="full"):
        store.add("grant", {"blob": "x" * 100_000}, uids=[5])
    store._db.execute("PRAGMA max_page_count = 1073741823")
    store.add("grant", {"n": 1})
    assert [e["data"].get("n") for e in store.query()] == [0, 1]
    assert store.integrity_check() == "ok"
