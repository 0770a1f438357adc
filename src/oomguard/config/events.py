"""``[events]``: the event store and the kernel log it records from."""

from __future__ import annotations

from dataclasses import dataclass

from oomguard.config.table import Table
from oomguard.config.values import ConfigError
from oomguard.host import kmsg


@dataclass(frozen=True)
class EventsConfig:
    db: str = "/var/lib/oomguard/events.db"
    max_age: float = 30 * 86400.0
    max_rows: int = 200_000
    kmsg: str = kmsg.DEVICE


def absolute_path(t: Table, name: str) -> str:
    """A path key that must be absolute: the daemon's cwd is not the operator's."""
    value = t.get(name, kind=str)
    if not value.startswith("/"):
        raise ConfigError(f"{t.k(name)}: must be an absolute path, got {value!r}")
    return value


def parse_events(t: Table) -> EventsConfig:
    cfg = EventsConfig(
        db=absolute_path(t, "db"),
        max_age=t.duration("max_age"),
        max_rows=t.bounded_int("max_rows", 100, 100_000_000),
        kmsg=t.get("kmsg", kind=str),
    )
    t.done()
    return cfg
