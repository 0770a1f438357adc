"""The control client: one request to the daemon's socket, one reply.

Every `oomguard` query and each login's `motd` starts here, so it imports
little: the socket from ``_socket`` (``socket`` adds enum and selectors),
and JSON through ``_json``, the C half of ``json`` (``json`` itself
compiles regular expressions at import, most of a query's start-up).
``encode`` and ``decode`` give exactly what ``json.dumps`` and
``json.loads`` give for a request and a reply (test_cli_fast compares
them); anything unusual goes to ``json`` itself.
"""

from __future__ import annotations

import _socket as socket
import os

try:
    import _json
except ImportError:  # an interpreter without the accelerator
    _json = None

TYPE_CHECKING = False  # importing typing for it costs a login 4 ms

if TYPE_CHECKING:
    from typing import Any

# config.broker's default, kept here so a login's `oomguard motd` need not
# import the config schema; test_cli_options checks that the two agree.
DEFAULT_SOCKET = "/run/oomguard/protect.sock"
# The events store's largest page (forensics.eventschema), kept here for the
# same reason: importing the store would import sqlite3 and the schema.
MAX_PAGE = 500


class DaemonError(Exception):
    """The daemon could not be reached or refused; the message says why."""


def socket_path(configured: str | None = None) -> str:
    return os.environ.get("OOMGUARD_SOCKET") or configured or DEFAULT_SOCKET


def request(op: str, path: str | None = None, timeout: float = 30.0, **fields: Any) -> dict:
    path = socket_path(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonError(f"the oomguard daemon is not running (no socket at {path})") from None
        except OSError as e:
            raise DaemonError(f"cannot reach the daemon at {path}: {e.strerror or e}") from None
        s.sendall((encode({"op": op, **fields}) + "\n").encode())
        chunks = []
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    except TimeoutError:
        raise DaemonError(f"the daemon did not answer within {timeout:g}s") from None
    finally:
        s.close()
    try:
        reply = decode(b"".join(chunks))
    except ValueError:
        raise DaemonError("the daemon sent a malformed reply") from None
    if not reply.get("ok"):
        raise DaemonError(str(reply.get("error", "refused")))
    return reply


def _not_serializable(o: object) -> object:
    raise TypeError(f"Object of type {o.__class__.__name__} is not JSON serializable")


def encode(obj: object) -> str:
    """``json.dumps(obj)``."""
    if _json is None:
        import json

        return json.dumps(obj)
    enc = _json.make_encoder({}, _not_serializable, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True)
    return "".join(enc(obj, 0))


class _Scanning:
    """What ``_json.make_scanner`` reads of a decoder: json.loads' defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__


def decode(raw: bytes) -> Any:
    """``json.loads(raw)``: the same value, or a ValueError where it raises one."""
    if _json is None or raw[:1] != b"{" or raw[1:2] in (b"", b"\0"):
        import json  # not a reply as the daemon writes them: json's own encoding detection and errors

        return json.loads(raw)
    text = raw.decode("utf-8", "surrogatepass")
    try:
        obj, end = _json.make_scanner(_Scanning())(text, 0)
    except StopIteration:
        raise ValueError("Expecting value") from None
    if text[end:].strip(" \t\n\r"):
        raise ValueError("Extra data")
    return obj


def events(path: str | None = None, *, limit: int = 1000, **filters: Any) -> list[dict]:
    """The newest ``limit`` events, oldest first, fetched page by page (the
    daemon sends at most one bounded page per request)."""
    pages: list[list[dict]] = []
    cursor = None
    got = 0
    while True:
        reply = request("events", path, limit=limit - got, page=MAX_PAGE, before=cursor, **filters)
        pages.append(reply["events"])
        got += len(reply["events"])
        cursor = reply.get("next")
        if not cursor or got >= limit or not reply["events"]:
            break
    return [e for page in reversed(pages) for e in page]
