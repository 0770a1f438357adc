"""Logging to systemd-journald through its native protocol, with stderr as fallback.

The protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL): one datagram per entry to
/run/systemd/journal/socket, each field either ``NAME=value\\n`` or, for a
value that holds a newline (or any other byte journald must not split on),
``NAME\\n`` + the value's length as 64-bit little endian + the value + ``\\n``.
An entry too big for a datagram goes in a sealed memfd passed with
SCM_RIGHTS.  Every value here is written in the binary-safe form if it could
end a field early, so that a hostile command line or comm ("x\\nMESSAGE_ID=...")
can never add or replace a field.

``event_fields(kind, data)`` turns an oomguard event into journal fields: a
stable MESSAGE_ID per kind (``journalctl MESSAGE_ID=...`` finds every grant,
whatever its text) and ``OOMGUARD_*`` fields; a log call carries them as
``extra={"journal_fields": ...}``.
"""

from __future__ import annotations

import array
import fcntl
import json
import logging
import os
import re
import socket
import stat
import struct
import sys
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

JOURNAL_SOCKET = "/run/systemd/journal/socket"
EXTRA_ATTR = "journal_fields"  # logging extra={EXTRA_ATTR: event_fields(...)}

#: One fixed 128-bit id per event kind; never change one (queries depend on it).
MESSAGE_IDS: dict[str, str] = {
    "grant": "9156d878b5a14efdb08828b730eb06ee",
    "refusal": "4b5d9c053acf47078f55b2e80526bd7a",
    "run_end": "53dc2be0e0464ffcb03e97a23193538d",
    "oom_kill": "3c16ca44205f4ddfb7ffd314416a24e3",
    "healer": "794ad3330adb461984bd6bcd2bc3fd5e",
    "storm": "e71020bc23eb48a2a86bb2d705415788",
    "oom_livelock": "79bbcb0ddfca4aa9b6e5244d47e1c9b3",
    "warning": "a5b2876761e14580ae9ab4546c4c5a7a",
}

# logging level -> syslog priority
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))

# Event keys whose journal name says more than the key itself.
_ALIASES = {
    "run": "RUN_ID",
    "task_memcg": "CGROUP",
    "comm": "COMM",
}
# Kinds whose "id" is a run's id.
_RUN_KINDS = {"grant", "run_end"}
_MAX_NAME = 64
_BAD_NAME_CHARS = re.compile(r"[^A-Z0-9_]")

FieldValue = str | bytes | int | float | Iterable[str | bytes | int | float]


def field_name(key: str, prefix: str = "OOMGUARD_") -> str:
    """A valid journal field name: A-Z, 0-9 and _, not starting with _ or a digit, <= 64."""
    name = _BAD_NAME_CHARS.sub("_", (prefix + key).upper()).lstrip("_0123456789")
    return name[:_MAX_NAME] or "OOMGUARD_FIELD"


def _scalar(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, str | int | float):
        return str(value)
    return json.dumps(value, sort_keys=True, default=str)


def event_fields(kind: str, data: Mapping[str, Any]) -> dict[str, str | list[str]]:
    """Journal fields for an oomguard event (``kind`` as the event store names it).

    MESSAGE_ID for the known kinds, OOMGUARD_EVENT=kind and one OOMGUARD_<KEY>
    per key of ``data``; lists of plain values become repeated fields, other
    structures JSON.  Runs go in OOMGUARD_RUN_ID (a grant's or run end's id,
    a healer action's run, every run alive at an OOM kill), the victim's cgroup
    (or the run's) in OOMGUARD_CGROUP, and the services a healer action
    restarted in OOMGUARD_SERVICE.
    """
    fields: dict[str, str | list[str]] = {"OOMGUARD_EVENT": kind}
    if kind in MESSAGE_IDS:
        fields["MESSAGE_ID"] = MESSAGE_IDS[kind]

    def add(name: str, value: Any) -> None:
        if isinstance(value, list | tuple | set | frozenset):
            values = [v for v in map(_scalar, value) if v is not None]
            if values:
                old = fields.get(name, [])
                fields[name] = (old if isinstance(old, list) else [old]) + values
        elif (text := _scalar(value)) is not None:
            fields.setdefault(name, text)

    for key, value in data.items():
        if key == "id" and kind in _RUN_KINDS:
            add("OOMGUARD_RUN_ID", value)
        elif key == "protected_runs" and isinstance(value, list):
            add("OOMGUARD_RUN_ID", [r.get("id") for r in value if isinstance(r, Mapping)])
            add("OOMGUARD_PROTECTED_RUNS", json.dumps(value, sort_keys=True, default=str))
        elif key == "services" and isinstance(value, list):
            names = [s.get("name") if isinstance(s, Mapping) else s for s in value]
            add("OOMGUARD_SERVICE", [n for n in names if isinstance(n, str)])
            add("OOMGUARD_SERVICES", json.dumps(value, sort_keys=True, default=str))
        else:
            add(field_name(_ALIASES.get(key, key)), value)
    if "OOMGUARD_CGROUP" not in fields and "OOMGUARD_OOM_MEMCG" in fields:
        fields["OOMGUARD_CGROUP"] = fields["OOMGUARD_OOM_MEMCG"]  # a livelock's or storm's cgroup
    return fields


def _as_bytes(value: str | bytes | int | float) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogateescape")


def encode(fields: Mapping[str, FieldValue]) -> bytes:
    """One journal entry in the native format; list values repeat the field."""
    out = bytearray()
    for name, value in fields.items():
        key = name.encode("ascii")
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            raw = _as_bytes(v)
            if b"\n" in raw or b"\0" in raw:
                out += key + b"\n" + struct.pack("<Q", len(raw)) + raw + b"\n"
            else:
                out += key + b"=" + raw + b"\n"
    return bytes(out)


class JournalSocket:
    """Delivers encoded entries to journald: a datagram, or a sealed memfd if too big."""

    def __init__(self, path: str = JOURNAL_SOCKET):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def send(self, entry: bytes) -> None:
        """Raises OSError if journald is not there."""
        try:
            self._sock.sendto(entry, self.path)
        except OSError as e:
            if e.errno not in (90, 105):  # EMSGSIZE, ENOBUFS: too big for a datagram
                raise
            self._send_memfd(entry)

    def _send_memfd(self, entry: bytes) -> None:
        fd = os.memfd_create("oomguard-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(entry)
            while view:
                view = view[os.write(fd, view) :]
            # journald accepts only a memfd nobody can change any more
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            self._sock.sendmsg([], rights, 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._sock.close()


class JournalHandler(logging.Handler):
    """A logging handler that writes journal entries, or to ``fallback`` if journald is gone.

    Each record gives MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, CODE_FILE,
    CODE_LINE, CODE_FUNC, the logger's name as OOMGUARD_LOGGER and the fields
    in ``record.journal_fields`` (see event_fields).
    """

    def __init__(
        self,
        path: str = JOURNAL_SOCKET,
        *,
        identifier: str = "oomguard",
        fallback: TextIO | None = None,
        level: int = logging.NOTSET,
    ):
        super().__init__(level)
        self.identifier = identifier
        self.journal = JournalSocket(path)
        self.fallback = logging.StreamHandler(fallback if fallback is not None else sys.stderr)

    def setFormatter(self, fmt: logging.Formatter | None) -> None:  # noqa: N802 (logging's name)
        super().setFormatter(fmt)
        self.fallback.setFormatter(fmt)

    def fields(self, record: logging.LogRecord) -> dict[str, FieldValue]:
        message = self.format(record)
        fields: dict[str, FieldValue] = {
            "MESSAGE": message,
            "PRIORITY": str(priority(record.levelno)),
            "SYSLOG_IDENTIFIER": self.identifier,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
            "OOMGUARD_LOGGER": record.name,
        }
        extra = getattr(record, EXTRA_ATTR, None)
        if isinstance(extra, Mapping):
            for name, value in extra.items():
                if name not in fields:  # extra fields never replace MESSAGE or PRIORITY
                    fields[field_name(name, prefix="")] = value
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = encode(self.fields(record))
        except Exception:  # noqa: BLE001 (logging's contract: never raise)
            self.handleError(record)
            return
        try:
            self.journal.send(entry)
        except OSError:
            self.fallback.emit(record)

    def close(self) -> None:
        self.journal.close()
        super().close()


def priority(levelno: int) -> int:
    """The syslog priority of a logging level."""
    return next((prio for level, prio in _PRIORITIES if levelno >= level), 7)


def stream_is_journal(environ: Mapping[str, str], fd: int) -> bool:
    """$JOURNAL_STREAM ("DEV:INODE") names ``fd``: systemd connected it to journald."""
    try:
        dev, ino = (int(part) for part in environ["JOURNAL_STREAM"].split(":"))
        st = os.fstat(fd)
    except (KeyError, ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def journal_present(path: str = JOURNAL_SOCKET) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def make_handler(
    *,
    environ: Mapping[str, str] | None = None,
    stderr: TextIO | None = None,
    path: str = JOURNAL_SOCKET,
    identifier: str = "oomguard",
) -> logging.Handler:
    """JournalHandler when $JOURNAL_STREAM is our stderr or journald's socket is
    there (it falls back to stderr per record if sending fails), else a plain
    stderr handler."""
    stderr = stderr if stderr is not None else sys.stderr
    environ = os.environ if environ is None else environ
    try:
        fd = stderr.fileno()
    except (AttributeError, OSError, ValueError):
        fd = -1
    if stream_is_journal(environ, fd) or journal_present(path):
        return JournalHandler(path, identifier=identifier, fallback=stderr)
    return logging.StreamHandler(stderr)
