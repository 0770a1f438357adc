"""The event store: kernel OOM kills, protect grants and refusals, healer
decisions and policy changes, in SQLite.

Durability: WAL mode with ``synchronous=FULL``, so a committed event survives
the daemon being killed at any moment and the machine losing power right
after (the reboot after an OOM livelock is exactly when the events matter).
Each ``add`` is one transaction; an event and the state that says it was
recorded (such as the last kernel log sequence number) can be written in the
same transaction, so a restart neither loses nor repeats it.

Retention: each kind belongs to a retention class (kills, runs, healer,
noise), and ``max_rows`` bounds each class on its own, so a flood of one kind
(refusals) never evicts another (a user's grant, a kernel kill). Refusals of
one uid for one reason within ``COALESCE_WINDOW`` seconds share one row that
counts them.

Privacy: each event names the uids allowed to see it. ``query(uid=...)``
returns only events naming that uid; ``uid=None`` (root) returns all.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from oomguard.config import ConfigError, parse_duration
from oomguard.forensics.eventschema import (  # the store's public constants, re-exported
    COALESCE_FIELDS,
    COALESCE_WINDOW,
    KINDS,
    MAX_PAGE,
    MIGRATIONS,
    PAGE,
    RETENTION,
    SCHEMA_VERSION,
    split_sql,
)


class StoreError(RuntimeError):
    """The database cannot be used (newer schema, corrupt file, ...)."""


class EventStore:
    """One SQLite connection guarded by a lock; safe to share between threads.

    ``max_age`` (seconds) and ``max_rows`` bound what ``prune`` keeps; ``add``
    prunes by itself every ``prune_every`` inserts."""

    def __init__(self, path: str, max_age: float, max_rows: int, *, prune_every: int = 500, readonly: bool = False):
        self.path = path
        self.max_age = max_age
        self.max_rows = max_rows
        self.prune_every = prune_every
        self._lock = threading.Lock()
        self._adds = 0
        # Told each committed event (the daemon's hooks); must not block.
        self.on_added: Callable[[dict[str, Any]], None] | None = None
        if readonly:  # the event reader's: the daemon created and migrated it
            from urllib.parse import quote

            self._db = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, timeout=10,
                                       isolation_level=None, check_same_thread=False)  # fmt: skip
            if self.schema_version != SCHEMA_VERSION:
                self._db.close()
                raise StoreError(f"{path}: schema version {self.schema_version}, expected {SCHEMA_VERSION}")
            return
        if path != ":memory:":
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            # Events name other users' processes: readable by root only.
            # SQLite gives the -wal and -shm files the same mode.
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.close(fd)
        self._db = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
        try:
            self._setup()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise StoreError(f"{path}: {e}") from e

    # -------------------------------------------------------------- setup

    def _setup(self) -> None:
        db = self._db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {version} is newer than this oomguard knows "
                f"({SCHEMA_VERSION}); refusing to touch it"
            )
        if version == 0:
            # Only settable before the first table exists; lets prune give
            # pages back to the filesystem.
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if self.path != ":memory:" and mode.lower() != "wal":
            raise StoreError(f"{self.path}: cannot switch to WAL mode (got {mode})")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA journal_size_limit = 4194304")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            self._migrate(target)

    def _migrate(self, target: int) -> None:
        # executescript() commits on its own, so run the statements one by one
        # inside our transaction: a crash leaves the old version intact.
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for stmt in split_sql(MIGRATIONS[target - 1]):
                db.execute(stmt)
            db.execute(f"PRAGMA user_version = {target}")
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise

    @property
    def schema_version(self) -> int:
        with self._lock:
            return self._db.execute("PRAGMA user_version").fetchone()[0]

    # -------------------------------------------------------------- writes

    def add(
        self,
        kind: str,
        data: Mapping[str, Any],
        *,
        ts: float | None = None,
        uids: Iterable[int] = (),
        state: Mapping[str, str] | None = None,
    ) -> int:
        """Record one event and return its id. ``uids`` are the users allowed
        to see it (root always may). ``state`` keys are set in the same
        transaction (e.g. the kernel log position the event came from)."""
        if not kind or not isinstance(kind, str):
            raise ValueError("an event needs a kind")
        record = dict(data)
        owners = sorted({int(u) for u in uids if int(u) >= 0})
        when = time.time() if ts is None else float(ts)
        key = _coalesce_key(kind, record)
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                event_id = self._count_repeat_locked(key, when, record) if key else None
                if event_id is None:
                    if key:
                        record["count"] = 1
                    text = json.dumps(record, separators=(",", ":"), default=str)
                    cur = db.execute(
                        "INSERT INTO events (ts, kind, data, coalesce_key) VALUES (?, ?, ?, ?)",
                        (when, kind, text, key),
                    )
                    event_id = int(cur.lastrowid or 0)
                    db.executemany(
                        "INSERT INTO event_uids (uid, event_id) VALUES (?, ?)",
                        [(u, event_id) for u in owners],
                    )
                for key, value in (state or {}).items():
                    self._set_state_locked(key, value)
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
            self._adds += 1
            due = self.prune_every > 0 and self._adds % self.prune_every == 0
        if self.on_added is not None:  # only once committed: a hook never sees a lost event
            self.on_added({"id": event_id, "ts": when, "kind": kind, "data": record, "uids": owners,
                           "repeat": bool(key) and "count" not in record})
        if due:
            self.prune()
        return event_id

    def _count_repeat_locked(self, key: str, when: float, record: dict[str, Any]) -> int | None:
        """Count a repeat on the row of ``key`` opened within the window, if
        any, and return its id."""
        row = self._db.execute(
            "SELECT id, data FROM events WHERE coalesce_key = ? AND ts >= ? "
            "ORDER BY ts DESC, id DESC LIMIT 1",
            (key, when - COALESCE_WINDOW),
        ).fetchone()
        if row is None:
            return None
        event_id, text = row
        merged = json.loads(text)
        count = int(merged.get("count", 1)) + 1
        merged.update(record, count=count, last_ts=when)
        self._db.execute(
            "UPDATE events SET data = ? WHERE id = ?",
            (json.dumps(merged, separators=(",", ":"), default=str), event_id),
        )
        return int(event_id)

    def prune(self, now: float | None = None) -> int:
        """Drop events older than max_age and, in each retention class, the
        oldest beyond max_rows; return how many went."""
        cutoff = (time.time() if now is None else now) - self.max_age
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                gone = db.execute("DELETE FROM events WHERE ts < ?", (cutoff,)).rowcount
                for where, kinds in _retention_classes():
                    (count,) = db.execute(
                        f"SELECT COUNT(*) FROM events WHERE {where}", kinds
                    ).fetchone()
                    if count > self.max_rows:
                        gone += db.execute(
                            f"DELETE FROM events WHERE id IN (SELECT id FROM events "
                            f"WHERE {where} ORDER BY ts, id LIMIT ?)",
                            (*kinds, count - self.max_rows),
                        ).rowcount
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
            if gone:
                db.execute("PRAGMA incremental_vacuum").fetchall()  # frees a page per step
        return gone

    # -------------------------------------------------------------- reads

    def query(
        self,
        *,
        since: float | None = None,
        kinds: Iterable[str] | None = None,
        uid: int | None = None,
        limit: int = 1000,
        until: float | None = None,
    ) -> list[dict[str, Any]]:
        """The newest ``limit`` matching events, oldest first. ``uid=None``
        means root (everything); otherwise only events that name ``uid``."""
        return self._newest(since, until, kinds, uid, None, limit)[::-1]

    def page(
        self,
        *,
        before: tuple[float, int] | None = None,
        since: float | None = None,
        kinds: Iterable[str] | None = None,
        uid: int | None = None,
        limit: int = PAGE,
    ) -> tuple[list[dict[str, Any]], bool]:
        """One page for a reader walking back in time: the newest ``limit``
        (at most MAX_PAGE) matching events older than the ``before`` cursor
        (an event's (ts, id)), oldest first, and whether older ones remain.
        Only the page is ever in memory, however many events match."""
        size = max(1, min(int(limit), MAX_PAGE))
        rows = self._newest(since, None, kinds, uid, before, size + 1)
        return rows[:size][::-1], len(rows) > size

    def _newest(self, since, until, kinds, uid, before, limit: int) -> list[dict[str, Any]]:
        where, args = [], []
        if since is not None:
            where.append("e.ts >= ?")
            args.append(float(since))
        if until is not None:
            where.append("e.ts < ?")
            args.append(float(until))
        if before is not None:
            where.append("(e.ts < ? OR (e.ts = ? AND e.id < ?))")
            args.extend((float(before[0]), float(before[0]), int(before[1])))
        if kinds is not None:
            ks = list(kinds)
            if not ks:
                return []
            where.append(f"e.kind IN ({','.join('?' * len(ks))})")
            args.extend(ks)
        if uid is not None:
            where.append(
                "EXISTS (SELECT 1 FROM event_uids v WHERE v.event_id = e.id AND v.uid = ?)"
            )
            args.append(int(uid))
        sql = (
            "SELECT e.id, e.ts, e.kind, e.data, "
            "(SELECT group_concat(u.uid) FROM event_uids u WHERE u.event_id = e.id) "
            "FROM events e"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY e.ts DESC, e.id DESC LIMIT ?"
        )
        args.append(max(0, int(limit)))
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [
            {
                "id": event_id,
                "ts": ts,
                "kind": kind,
                "uids": sorted(int(u) for u in owners.split(",")) if owners else [],
                "data": json.loads(data),
            }
            for event_id, ts, kind, data, owners in rows
        ]

    def run_ids(self, kind: str, since: float) -> set[int]:
        """The run ids named (data "id") by events of ``kind`` since ``since``:
        which runs' grant or end is on record, at a restart."""
        with self._lock:
            rows = self._db.execute(
                "SELECT json_extract(data, '$.id') FROM events WHERE kind = ? AND ts >= ?", (kind, since)
            ).fetchall()
        return {r[0] for r in rows if isinstance(r[0], int)}

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]

    # -------------------------------------------------------------- state

    def get_state(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_state(self, key: str, value: str) -> None:
        self.set_states({key: value})

    def set_states(self, values: Mapping[str, str]) -> None:
        """Set several state keys in one transaction: all or none."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                for key, value in values.items():
                    self._set_state_locked(key, value)
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise

    def _set_state_locked(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO state (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(key), str(value)),
        )

    # -------------------------------------------------------------- misc

    def integrity_check(self) -> str:
        with self._lock:
            return self._db.execute("PRAGMA integrity_check").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA optimize")
            except sqlite3.Error:
                pass
            self._db.close()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rollback(db: sqlite3.Connection) -> None:
    # SQLite rolls back by itself on SQLITE_FULL and some I/O errors; a
    # second ROLLBACK would then raise and hide the real error.
    if db.in_transaction:
        db.execute("ROLLBACK")


def _coalesce_key(kind: str, record: Mapping[str, Any]) -> str | None:
    fields = COALESCE_FIELDS.get(kind)
    if fields is None or any(record.get(f) is None for f in fields):
        return None
    return json.dumps([kind, *(record[f] for f in fields)], default=str)


def _retention_classes() -> list[tuple[str, tuple[str, ...]]]:
    """(SQL condition, its arguments) per class; kinds this version does not
    know (a newer daemon's) are bounded together."""

    def marks(kinds: tuple[str, ...]) -> str:
        return ",".join("?" * len(kinds))

    classes = [(f"kind IN ({marks(kinds)})", kinds) for kinds in RETENTION.values()]
    classes.append((f"kind NOT IN ({marks(KINDS)})", KINDS))
    return classes


# ---------------------------------------------------------------- --since


_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")


def parse_since(text: str, now: float | None = None) -> float:
    """A cutoff timestamp from ``--since``: a duration back from now ("90s",
    "3m", "1h", "2d") or an ISO date/time ("2024-05-01", "2024-05-01 13:00",
    "2024-05-01T13:00:00+02:00"; without a zone it is local time)."""
    value = text.strip()
    if not value:
        raise ValueError("--since: empty value")
    if _ISO_DATE.match(value):
        try:
            when = datetime.fromisoformat(
                value.replace("Z", "+00:00") if value.endswith("Z") else value
            )
        except ValueError:
            raise ValueError(f"--since: not an ISO date/time: {text!r}") from None
        return when.timestamp()  # naive means local time
    try:
        seconds = parse_duration(value, "--since")
    except ConfigError:
        raise ValueError(
            f"--since: expected a duration like 90s, 3m, 1h, 2d or an ISO date/time, got {text!r}"
        ) from None
    return (time.time() if now is None else now) - seconds
