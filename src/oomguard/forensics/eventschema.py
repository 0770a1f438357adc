"""The event store's schema: its migrations, retention classes and paging
bounds. Each migration upgrades the schema by one version (PRAGMA
user_version)."""

from __future__ import annotations

RETENTION: dict[str, tuple[str, ...]] = {
    "kills": ("oom_kill", "oom_report", "oom_livelock", "storm"),
    "runs": ("grant", "run_end"),
    "healer": ("healer", "warning"),
    "noise": ("refusal", "policy", "setting"),
}
KINDS = tuple(kind for kinds in RETENTION.values() for kind in kinds)
# Kinds that a user can produce at will: repeats are counted on one row.
COALESCE_FIELDS: dict[str, tuple[str, ...]] = {"refusal": ("uid", "reason")}
COALESCE_WINDOW = 60.0
PAGE, MAX_PAGE = 100, 500  # events per page of a reply: the default, the most

# Each entry upgrades the schema by one version (PRAGMA user_version). Never
# edit a released entry; append a new one.
MIGRATIONS: list[str] = [
    # 1: events, who may see them, and a small key/value state table
    """
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        kind TEXT NOT NULL,
        data TEXT NOT NULL
    );
    CREATE INDEX events_ts ON events (ts);
    CREATE INDEX events_kind_ts ON events (kind, ts);
    CREATE TABLE event_uids (
        uid INTEGER NOT NULL,
        event_id INTEGER NOT NULL REFERENCES events (id) ON DELETE CASCADE,
        PRIMARY KEY (uid, event_id)
    ) WITHOUT ROWID;
    CREATE INDEX event_uids_event ON event_uids (event_id);
    CREATE TABLE state (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;
    """,
    # 2: the row that later repeats of a user-produced event are counted on
    """
    ALTER TABLE events ADD COLUMN coalesce_key TEXT;
    CREATE INDEX events_coalesce ON events (coalesce_key, ts) WHERE coalesce_key IS NOT NULL;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def split_sql(script: str) -> list[str]:
    # Migrations hold plain DDL: no semicolons inside strings or triggers.
    return [s.strip() for s in script.split(";") if s.strip()]
