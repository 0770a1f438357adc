"""The control client: one request to the daemon's socket, one reply."""

from __future__ import annotations

import json
import os
import socket

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
        s.sendall((json.dumps({"op": op, **fields}) + "\n").encode())
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
        reply = json.loads(b"".join(chunks))
    except ValueError:
        raise DaemonError("the daemon sent a malformed reply") from None
    if not reply.get("ok"):
        raise DaemonError(str(reply.get("error", "refused")))
    return reply


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
