"""`oomguard`: the admin command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from . import __version__, config
from .client import DaemonError, request


def _json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _load(args: argparse.Namespace) -> config.Config:
    return config.load(args.config)


# ---------------------------------------------------------------- commands


def cmd_daemon(args: argparse.Namespace) -> int:
    from . import daemon

    return daemon.main(args.config)


def cmd_config_check(args: argparse.Namespace) -> int:
    path = args.path or args.config
    cfg = config.load(path)
    print(f"{cfg.source or 'defaults (no config file)'}: OK")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    reply = request("runs", _socket(args), all=args.all)
    runs = reply["runs"]
    if args.json:
        _json(runs)
        return 0
    if not runs:
        print("no protected runs" if not args.all else "no runs recorded")
        return 0
    rows = [
        (r["id"], r["user"], r["pid"], ago(r["started"]), ago(r["ended"]) if r["ended"] else "running",
         r["exit_status"] if r["exit_status"] is not None else "-", r["cgroup"] or "-", r["command"][:60])
        for r in runs
    ]  # fmt: skip
    print(table(rows, ("RUN", "USER", "PID", "STARTED", "ENDED", "EXIT", "CGROUP", "COMMAND")))
    return 0


def cmd_kill_run(args: argparse.Namespace) -> int:
    reply = request("kill-run", _socket(args), id=args.id)
    print(reply.get("message", f"run {args.id} killed"))
    return 0


def _socket(args: argparse.Namespace) -> str:
    try:
        return config.load(args.config).protect.socket
    except config.ConfigError:
        return config.DEFAULT_SOCKET


# ---------------------------------------------------------------- parser


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oomguard", description="Tame the Linux OOM killer.")
    p.add_argument("--version", action="version", version=f"oomguard {__version__}")
    p.add_argument("--config", metavar="PATH", help=f"config file (default {config.DEFAULT_PATH})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("daemon", help="run the root daemon in the foreground")
    s.set_defaults(func=cmd_daemon)

    s = sub.add_parser("runs", help="list protected runs (yours, or all as root)")
    s.add_argument("--all", action="store_true", help="include ended runs")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_runs)

    s = sub.add_parser("kill-run", help="end one protected run as the healer would")
    s.add_argument("id", type=int)
    s.set_defaults(func=cmd_kill_run)

    s = sub.add_parser("config", help="configuration")
    csub = s.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    c = csub.add_parser("check", help="validate a config file")
    c.add_argument("path", nargs="?")
    c.set_defaults(func=cmd_config_check)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except config.ConfigError as e:
        print(f"oomguard: {e}", file=sys.stderr)
        return 2
    except DaemonError as e:
        print(f"oomguard: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
