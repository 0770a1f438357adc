"""The wire format: one JSON request line in, one JSON reply line out.

Every byte comes from a peer that may be hostile, so every field is checked
for its type and its range before anything uses it: integers are bounded
before any arithmetic (no float conversion of a 4,000-digit integer), NaN
and infinities are refused at parse time, lists are bounded in length and
their strings in size. A bad field is a ``Refusal`` with a message that
names it, never an "internal error".
"""

from __future__ import annotations

import json
import math
from typing import Any

from oomguard.telemetry.reasons import RefusalReason

MAX_REQUEST = 4096
MAX_OP = 64  # longer op names are echoed back cut to this
MAX_TIMESTAMP = 2.0**40  # epoch seconds: about the year 36812
MAX_ID = 2**63 - 1  # SQLite's and the registry's ids fit in this
MAX_REPLY = 1 << 20  # bytes of listed items in one reply; pages carry the rest


class Refusal(Exception):
    """A request the broker declines; ``reason`` is its metric label."""

    def __init__(self, message: str, reason: RefusalReason = RefusalReason.REFUSED):
        super().__init__(message)
        self.reason = reason


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def parse_request(line: bytes) -> dict:
    """A request line as a dict with a string "op"; Refusal if it is not one."""
    try:
        request = json.loads(line.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Refusal("malformed request: expected one JSON object", RefusalReason.INVALID) from None
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        raise Refusal("malformed request: expected a JSON object with an \"op\"", RefusalReason.INVALID)
    return request


def encode(reply: dict) -> bytes:
    """One reply line; "ok" first, as oom-protect reads the prefix."""
    ordered = {"ok": reply.get("ok", False), **{k: v for k, v in reply.items() if k != "ok"}}
    return (json.dumps(ordered, default=str) + "\n").encode()


def refused(error: str) -> dict:
    return {"ok": False, "error": error}


# ---------------------------------------------------------------- fields


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(request: dict, key: str, lo: int, hi: int, default: int | None, message: str) -> int | None:
    """An integer field within [lo, hi]; ``default`` when it is absent."""
    if key not in request:
        return default
    value = request[key]
    if not _is_int(value) or not lo <= value <= hi:
        raise Refusal(message, RefusalReason.INVALID)
    return value


def number(request: dict, key: str, lo: float, hi: float, message: str) -> float | None:
    """A finite number field within [lo, hi], as a float; None when absent
    or null. Integers are compared before conversion, so none overflows."""
    value = request.get(key)
    if value is None:
        return None
    if _is_int(value):
        if not lo <= value <= hi:
            raise Refusal(message, RefusalReason.INVALID)
        return float(value)
    if not isinstance(value, float) or not math.isfinite(value) or not lo <= value <= hi:
        raise Refusal(message, RefusalReason.INVALID)
    return value


def flag(request: dict, key: str) -> bool:
    """A boolean field, false when absent."""
    value = request.get(key, False)
    if not isinstance(value, bool):
        raise Refusal(f"{key} must be true or false", RefusalReason.INVALID)
    return value


def strings(request: dict, key: str, max_items: int, max_len: int, message: str) -> list[str] | None:
    """A list of short strings; None when absent or null."""
    value = request.get(key)
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) > max_items
        or not all(isinstance(v, str) and len(v) <= max_len for v in value)
    ):
        raise Refusal(message, RefusalReason.INVALID)
    return value


def cursor(request: dict, key: str) -> tuple[float, int] | None:
    """A page cursor ``[ts, id]`` as a reply's "next" gave it; None when absent."""
    value = request.get(key)
    if value is None:
        return None
    message = f"{key} must be the [ts, id] pair a reply's \"next\" gave"
    if not isinstance(value, list) or len(value) != 2:
        raise Refusal(message, RefusalReason.INVALID)
    ts = number({"ts": value[0]}, "ts", 0, MAX_TIMESTAMP, message)
    event_id = integer({"id": value[1]}, "id", 0, MAX_ID, None, message)
    if ts is None or event_id is None:
        raise Refusal(message, RefusalReason.INVALID)
    return ts, event_id
