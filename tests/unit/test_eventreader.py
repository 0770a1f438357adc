"""The event reader process: the same pages as the daemon would build, one
process reused, a fresh one after it died or went idle, a lower priority
than the daemon, and the daemon answering by itself when no reader can run."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from oomguard.forensics.eventpage import PageQuery, events_page, reply_line
from oomguard.forensics.eventreader import NICE, EventReader
from oomguard.forensics.events import EventStore

T0 = time.time() - 3600


@pytest.fixture
def store(tmp_path: Path):
    s = EventStore(str(tmp_path / "events.db"), max_age=86_400 * 30, max_rows=100_000)
    for n in range(300):
        s.add("policy", {"n": n, "comm": "php-fpm"}, ts=T0 + n, uids=[1000 + n % 3])
    s.add("oom_kill", {"victim_pid": 7, "victim_comm": "secret", "victim_uid": 1001,
                       "protected_runs": [{"id": 1, "uid": 1000, "command": "import"},
                                          {"id": 2, "uid": 1001, "command": "mysqldump --password=x"}]},
          ts=T0 + 400, uids=[1000, 1001])  # fmt: skip
    yield s
    s.close()


@pytest.fixture
def reader(store: EventStore):
    r = EventReader(store.path)
    yield r
    r.close()


def wait_for(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


QUERIES = [
    PageQuery(),
    PageQuery(uid=1000, size=50, limit=120),
    PageQuery(uid=1000, kinds=("oom_kill",)),
    PageQuery(since=T0 + 100, size=500, limit=100_000, before=(T0 + 250, 10**9)),
    PageQuery(size=500, limit=100_000, budget=4000),  # cut to the byte budget
    PageQuery(kinds=()),
]


@pytest.mark.parametrize("q", QUERIES, ids=range(len(QUERIES)))
def test_the_reader_answers_exactly_what_the_daemon_would(store: EventStore, reader: EventReader, q) -> None:
    assert reader.ask(q) == reply_line(events_page(store, q))


def test_a_user_sees_only_their_part_through_the_reader(reader: EventReader) -> None:
    import json

    reply = json.loads(reader.ask(PageQuery(uid=1000, kinds=("oom_kill",))))
    (kill,) = reply["events"]
    assert kill["uids"] == [1000] and kill["data"]["victim"] == "another user's process"
    assert [r["command"] for r in kill["data"]["protected_runs"]] == ["import"]


def test_one_reader_serves_many_pages_and_a_dead_one_is_replaced(reader: EventReader) -> None:
    for _ in range(5):
        assert reader.ask(PageQuery()) is not None
    assert reader.started == 1
    os.kill(reader._proc.pid, signal.SIGKILL)
    reader._proc.wait()
    assert reader.ask(PageQuery()) is not None  # a new reader, the same answer
    assert reader.started == 2


def test_an_idle_reader_exits_by_itself_and_the_next_page_starts_another(store: EventStore) -> None:
    r = EventReader(store.path, idle=0.3)
    try:
        assert r.ask(PageQuery()) is not None
        proc = r._proc
        wait_for(lambda: proc.poll() is not None)
        assert proc.returncode == 0
        assert r.ask(PageQuery()) is not None and r.started == 2
    finally:
        r.close()


def test_the_reader_runs_below_the_daemon(reader: EventReader) -> None:
    reader.ask(PageQuery())
    pid = reader._proc.pid
    assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + NICE)
    assert Path(f"/proc/{pid}/oom_score_adj").read_text().strip() == "0"


def test_a_reader_that_cannot_open_the_store_leaves_the_daemon_to_answer(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-store.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    r = EventReader(str(bad))
    try:
        assert r.ask(PageQuery()) is None and r.started == 1
        assert not r.usable  # no new reader per query while it keeps failing
        assert r.ask(PageQuery()) is None and r.started == 1
    finally:
        r.close()


def test_no_reader_for_a_store_in_memory() -> None:
    r = EventReader(":memory:")
    assert r.ask(PageQuery()) is None and r.started == 0
