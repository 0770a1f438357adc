"""EventWriter: callers never wait on the database, and nothing is lost to a
locked or full one (real SQLite: a second connection's write lock, and
max_page_count for SQLITE_FULL)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from oomguard.forensics.events import EventStore
from oomguard.forensics.eventwriter import EventWriter


@pytest.fixture
def store(tmp_path: Path):
    s = EventStore(str(tmp_path / "w.db"), max_age=1e9, max_rows=100_000, prune_every=0)
    yield s
    s.close()


def test_submitted_events_are_written_in_order_with_the_submit_time(store: EventStore) -> None:
    clock = iter([10.0, 11.0, 12.0])
    w = EventWriter(store, clock=lambda: next(clock))
    w.start()
    for n in range(3):
        assert w.submit("grant", {"n": n}, [1000 + n])
    assert w.flush(10)
    rows = store.query()
    assert [(e["ts"], e["data"]["n"], e["uids"]) for e in rows] == [
        (10.0, 0, [1000]), (11.0, 1, [1001]), (12.0, 2, [1002])]  # fmt: skip
    w.stop()
    assert not w.alive


def test_submit_does_not_wait_for_a_database_locked_by_another_process(store: EventStore) -> None:
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock, as another process would
    w = EventWriter(store)
    w.start()
    try:
        for n in range(50):
            assert w.submit("refusal", {"n": n})  # returns although nothing can be written
        assert store.count() == 0
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert w.flush(30)
    assert store.count() == 50
    w.stop()


def test_a_full_database_keeps_the_event_and_writes_it_once_there_is_room(store: EventStore) -> None:
    store.add("grant", {"n": -1})
    (pages,) = store._db.execute("PRAGMA page_count").fetchone()
    store._db.execute(f"PRAGMA max_page_count = {pages}")  # real SQLITE_FULL from here on
    with pytest.raises(sqlite3.OperationalError, match="full"):
        store.add("grant", {"blob": "x" * 100_000})
    w = EventWriter(store)
    w.start()
    assert w.submit("grant", {"blob": "y" * 100_000})
    assert not w.flush(0.5)  # still retrying, still queued
    assert w.failures >= 1 and store.count() == 1
    store._db.execute("PRAGMA max_page_count = 1073741823")
    assert w.flush(30)
    assert [e["data"].get("blob", "")[:1] for e in store.query()] == ["", "y"]
    w.stop()


def test_a_full_queue_drops_the_newest_and_counts_it(store: EventStore) -> None:
    dropped: list[str] = []
    w = EventWriter(store, maxsize=3, on_drop=dropped.append)  # not started: nothing drains
    assert [w.submit("policy", {"n": n}) for n in range(5)] == [True, True, True, False, False]
    assert w.dropped == 2 and dropped == ["policy", "policy"]
    w.start()
    assert w.flush(10)
    assert [e["data"]["n"] for e in store.query()] == [0, 1, 2]
    w.stop()


def test_stop_writes_what_is_queued(store: EventStore) -> None:
    w = EventWriter(store)
    for n in range(20):
        w.submit("healer", {"n": n})
    w.start()
    w.stop()
    assert store.count() == 20
