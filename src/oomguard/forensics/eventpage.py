"""One page of events as a user may see it: the body of the socket's
``events`` op, shared by the daemon and its event reader process.

A page is cut to a byte budget (the broker's reply cap), never the reply
left unbounded by a few huge events; it always holds at least one event, so
a reader walking back in time always moves on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from oomguard.forensics import privacy


class PageSource(Protocol):
    def page(self, *, before, since, kinds, uid, limit) -> tuple[list[dict[str, Any]], bool]: ...


@dataclass(frozen=True)
class PageQuery:
    """A checked request for one page (the broker's protocol checked every
    field); ``uid`` None is root."""

    since: float | None = None
    kinds: tuple[str, ...] | None = None
    limit: int = 1000  # events the whole walk wants
    size: int = 100  # events in this page at most
    before: tuple[float, int] | None = None
    uid: int | None = None
    budget: int = 1 << 20  # bytes of events in the reply

    def to_line(self) -> bytes:
        return (json.dumps(asdict(self)) + "\n").encode()

    @classmethod
    def from_line(cls, line: bytes) -> PageQuery:
        raw = json.loads(line)
        kinds, before = raw.pop("kinds"), raw.pop("before")
        return cls(kinds=None if kinds is None else tuple(kinds),
                   before=None if before is None else (float(before[0]), int(before[1])), **raw)  # fmt: skip


def events_page(store: PageSource, q: PageQuery) -> dict[str, Any]:
    """``{"events": [...], "next": cursor or None}``, oldest first."""
    rows, more = store.page(before=q.before, since=q.since, kinds=q.kinds, uid=q.uid, limit=min(q.limit, q.size))
    rows = privacy.events_for(rows, q.uid)
    fits = fitting(rows, q.budget)
    more, rows = more or fits < len(rows), rows[len(rows) - fits :]
    last = more and rows and len(rows) < q.limit
    return {"events": rows, "next": [rows[0]["ts"], rows[0]["id"]] if last else None}


def reply_line(page: dict[str, Any]) -> bytes:
    """The socket's reply line for a page ("ok" first, as every reply)."""
    return (json.dumps({"ok": True, **page}, default=str) + "\n").encode()


def fitting(items: Sequence[Any], budget: int) -> int:
    """How many of ``items``, counted from the end, encode within ``budget``
    bytes (at least one, so a page always moves on)."""
    if len(json.dumps(items, default=str)) <= budget:
        return len(items)  # the common case, in one call
    used = 0
    for n, item in enumerate(reversed(items)):
        used += len(json.dumps(item, default=str)) + 2
        if used > budget and n:
            return n
    return len(items)
