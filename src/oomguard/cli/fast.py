"""The start-up fast path for the socket-only queries: `runs`, `events` and
`status`, the commands an admin types most, and the plain `top`.

The argparse path imports argparse and the whole config schema (most of a
query's start-up) only to learn the socket's path. Here a small recognizer
takes the plain forms of those commands, and the socket is found without
the schema: a config that names no ``socket`` outside comments cannot
change it from the default. Anything else (another command, --help, an
abbreviated or ``--opt=value`` option, a value starting with "-", a config
that does mention ``socket``) returns None and takes the argparse path, so
output, errors and exit codes stay that path's.
"""

from __future__ import annotations

import os
import stat
import sys
import time

from oomguard.cli.client import DEFAULT_SOCKET, DaemonError, request

TYPE_CHECKING = False  # importing typing for it would cost every query 4 ms

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

# config.load's own values, kept here so that nothing imports the schema;
# test_cli_fast checks that they agree.
DEFAULT_CONFIG = "/etc/oomguard/oomguard.toml"
MAX_BYTES = 1 << 20
DROPIN_SUFFIX = ".toml"

# top's --cgroup (and --json, see _top) is left to argparse
FLAGS = {"runs": ("--all", "--json"), "events": ("--json",), "status": ("--json",), "top": ("--json",)}
VALUED = {"runs": ("--config",), "events": ("--config", "--since", "--kind", "--limit"), "status": ("--config",),
          "top": ("--config", "--limit", "-n")}  # fmt: skip


def parse(argv: Sequence[str]) -> dict[str, Any] | None:
    """What argparse would make of ``argv``, for the forms taken here; None
    for anything else (test_cli_fast compares the two over many argvs)."""
    args: dict[str, Any] = {"config": None, "id": None, "all": False, "json": False,
                            "since": None, "kind": [], "limit": 1000}  # fmt: skip
    i = 0
    while i + 1 < len(argv) and argv[i] == "--config" and _value(argv[i + 1]):
        args["config"] = argv[i + 1]
        i += 2
    if i >= len(argv) or argv[i] not in FLAGS:
        return None
    command = args["command"] = argv[i]
    if command == "top":
        args["limit"] = None  # show them all
    i += 1
    # argparse fills an optional positional at the first chance, so an id
    # after an option is an error there: it is taken right after "runs" only.
    if command == "runs" and i < len(argv) and _value(argv[i]):
        try:
            args["id"] = int(argv[i])
        except ValueError:
            return None
        i += 1
    while i < len(argv):
        opt = argv[i]
        if opt in FLAGS[command]:
            args[opt[2:]] = True
            i += 1
            continue
        if opt not in VALUED[command] or i + 1 >= len(argv) or not _value(argv[i + 1]):
            return None
        value = argv[i + 1]
        if opt == "--kind":
            args["kind"].append(value)
        elif opt in ("--limit", "-n"):
            try:
                args["limit"] = int(value)
            except ValueError:
                return None
        else:
            args[opt[2:]] = value
        i += 2
    return args


def _value(arg: str) -> bool:
    """An argument argparse takes as a value, never as an option."""
    return bool(arg) and not arg.startswith("-")


def find_socket(config_path: str | None) -> str | None:
    """The socket the argparse path would use, or None when only the
    config schema can tell (a config that mentions ``socket``)."""
    env = os.environ.get("OOMGUARD_SOCKET")
    if env:
        return env  # the client prefers it over any config
    if config_path is not None and config_path.endswith("/"):
        return None  # pathlib, as the loader uses, would drop the slash
    main = config_path if config_path is not None else DEFAULT_CONFIG
    try:
        text = _read(main)
    except FileNotFoundError:
        text = b""  # a missing default means defaults; a missing --config is an error, hence the default too
    except (OSError, ValueError):
        return DEFAULT_SOCKET  # the loader refuses the file, and _socket() falls back to the default
    if _names_socket(text):
        return None
    directory = os.path.join(os.path.dirname(main), os.path.basename(main) + ".d")
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(DROPIN_SUFFIX) and not n.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        names = []
    except OSError:
        return None
    for name in names:
        try:
            text = _read(os.path.join(directory, name))
        except FileNotFoundError:
            continue  # removed while we listed it, as the loader skips it
        except (OSError, ValueError):
            return DEFAULT_SOCKET
        if _names_socket(text):
            return None
    return DEFAULT_SOCKET


def _read(path: str) -> bytes:
    """config.load's reading rules: a regular file of at most MAX_BYTES,
    opened without blocking; ValueError for what it refuses."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BYTES:
            raise ValueError(path)
        chunks, total = [], 0
        while chunk := os.read(fd, MAX_BYTES + 1 - total):
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_BYTES:
                raise ValueError(path)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _names_socket(text: bytes) -> bool:
    """Whether any line but a comment could set a ``socket`` key. A key
    cannot start a line with "#", and one spelled with escapes ("\\u0073")
    counts as a mention."""
    for line in text.splitlines():
        line = line.lstrip()
        if line.startswith(b"#"):
            continue
        if b"socket" in line or b"\\u" in line or b"\\U" in line:
            return True
    return False


SINCE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}  # config.values' units


def since_of(text: str, now: float) -> float | None:
    """forensics.events.parse_since for the plain "90s", "3m", "1h", "2d"
    (test_cli_fast compares them); None for anything else."""
    value = text.strip()
    if len(value) < 2 or not value.isascii() or not value[:-1].isdigit() or value[-1] not in SINCE_UNITS:
        return None
    return now - float(value[:-1]) * SINCE_UNITS[value[-1]]


def _top(args: dict[str, Any]) -> int | None:
    """`oomguard top` needs neither the daemon nor the config: at 10,000
    processes the argparse path's start-up is a tenth of its time."""
    if args["json"]:
        return None  # commands' JSON printer
    from oomguard.cli.render import format_ranking
    from oomguard.forensics import ranking

    try:
        print(format_ranking(ranking.rank_global(), args["limit"]))
    except BrokenPipeError:
        pass
    return 0


def run(argv: Sequence[str]) -> int | None:
    """Run ``argv`` if it is a query taken here; None to take the argparse path."""
    args = parse(argv)
    if args is None:
        return None
    if args["command"] == "top":
        return _top(args)
    sock = find_socket(args["config"])
    if sock is None:
        return None
    from oomguard.cli import queries

    try:
        if args["command"] == "runs":
            return queries.show_runs(sock, args["id"], args["all"], args["json"])
        if args["command"] == "events":
            since = None
            if args["since"]:
                since = since_of(args["since"], time.time())
                if since is None:
                    return None  # an ISO time, or an error the argparse path words
            return queries.show_events(sock, since, args["kind"] or None, args["limit"], args["json"])
        try:
            data = request("status", sock)
            data.pop("ok", None)
        except DaemonError as e:
            from oomguard.cli.commands import status_without_daemon
            from oomguard.config import ConfigError

            try:
                data = status_without_daemon(args["config"], e)
            except ConfigError as ce:
                print(f"oomguard: {ce}", file=sys.stderr)
                return 2
        return queries.show_status(data, args["json"])
    except DaemonError as e:
        print(f"oomguard: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
