"""The admin command line's commands and parser (``oomguard.cli.main`` routes here)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from oomguard import __version__, config
from oomguard.cli import queries
from oomguard.cli.client import DaemonError, request
from oomguard.cli.queries import dump_json as _json
from oomguard.cli.render import ago, describe_event, format_ranking, render_status, table  # noqa: F401 - the tests' names
from oomguard.cli.terminal import printable


def _load(args: argparse.Namespace) -> config.Config:
    return config.load(args.config)


# ---------------------------------------------------------------- commands


def cmd_daemon(args: argparse.Namespace) -> int:
    from oomguard import daemon

    return daemon.main(args.config)


def cmd_config_check(args: argparse.Namespace) -> int:
    path = args.path or args.config
    cfg = config.load(path)
    print(f"{cfg.source or 'defaults (no config file)'}: OK")
    for f in cfg.files[1:] if cfg.files[:1] == (cfg.source,) else cfg.files:
        print(f"  merged over it: {f}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from oomguard.config import dropins

    path = args.path or args.config
    # refuses what the daemon would refuse
    cfg, layers = config.load_layers(*((config.DEFAULT_PATH, False) if path is None else (Path(path), True)))
    leaves = dropins.flatten(layers.data)
    if args.json:
        _json({"files": list(cfg.files), "values": [
            {"key": k, "value": v, "from": layers.origins.get(k)} for k, v in leaves]})  # fmt: skip
        return 0
    print(f"# {len(cfg.files)} file(s): {', '.join(cfg.files) or 'none, all defaults'}; unset keys have their defaults")
    for key, value in leaves:
        print(f"{key} = {json.dumps(value, default=str)}  # {layers.origins.get(key, '?')}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    return queries.show_runs(_socket(args), args.id, args.all, args.json)


def cmd_kill_run(args: argparse.Namespace) -> int:
    reply = request("kill-run", _socket(args), id=args.id)
    print(printable(reply.get("message", f"run {args.id} killed")))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    try:
        data = request("status", _socket(args))
        data.pop("ok", None)
    except DaemonError as e:
        data = status_without_daemon(args.config, e)
    return queries.show_status(data, args.json)


def status_without_daemon(config_path: str | None, error: DaemonError) -> dict:
    """What `status` shows when the daemon cannot be asked: this host's own scan."""
    from oomguard.forensics import status

    return {**status.collect(config.load(config_path)), "daemon": None, "daemon_error": str(error)}


def cmd_top(args: argparse.Namespace) -> int:
    from oomguard.forensics import ranking

    r = ranking.rank(args.cgroup)
    if args.json:
        _json(r.as_dict())
        return 0
    print(format_ranking(r, args.limit))
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from oomguard.forensics.events import parse_since

    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as e:
        raise config.ConfigError(f"--since: {e}") from None
    return queries.show_events(_socket(args), since, args.kind or None, args.limit, args.json)


def cmd_policy_show(args: argparse.Namespace) -> int:
    from oomguard.policy import rules as policy

    cfg = _load(args)
    decisions = policy.show(cfg, _registry(cfg))
    if args.classes:
        rows = policy.class_table(policy.classes_for(cfg))
        if args.json:
            _json(rows)
        else:
            print(table([(r["name"], r["oom_score_adj"], r["essential"], r["healer_exempt"],
                          "; ".join(f"{k}={','.join(map(str, r[k]))}" for k in ("user", "exe", "unit", "cgroup", "comm", "cmdline", "parent") if k in r))
                         for r in rows], ("CLASS", "ADJ", "ESSENTIAL", "EXEMPT", "MATCHES")))  # fmt: skip
        return 0
    if not args.all:
        decisions = [d for d in decisions if d.class_name or d.action == "set"]
    if args.json:
        _json([d.as_dict() for d in decisions])
        return 0
    print(table([(d.pid, d.uid, d.comm, d.class_name or "-", d.current, "-" if d.wanted is None else d.wanted,
                  d.action, d.reason) for d in decisions],
                ("PID", "UID", "COMM", "CLASS", "ADJ", "WANTED", "ACTION", "REASON")))  # fmt: skip
    return 0


def _registry(cfg: config.Config):
    from pathlib import Path

    from oomguard.runs.registry import RunRegistry

    path = Path(cfg.state_dir) / "runs.json"
    return RunRegistry.open_read_only(path) if path.exists() else None  # never writes the daemon's file


def cmd_policy_apply(args: argparse.Namespace) -> int:
    from oomguard.policy import rules as policy

    cfg = _load(args)
    changes = policy.apply_once(cfg, _registry(cfg), dry_run=args.dry_run)
    if args.json:
        _json([c.as_dict() for c in changes])
        return 0
    verb = "would set" if args.dry_run else "set"
    for c in changes:
        status = f"FAILED: {c.error}" if c.error else verb
        print(f"{status} pid {c.pid} {printable(c.comm)} ({c.class_name or 'inherited'}): {c.old} -> {c.new}")
    print(f"{len(changes)} change(s)" + (" (dry run)" if args.dry_run else ""))
    return 1 if any(c.error for c in changes) else 0


def cmd_setup(args: argparse.Namespace) -> int:
    from oomguard.cli import setup

    try:
        if args.uninstall:
            setup.remove_layout(_load(args), root=args.root)
        else:
            setup.apply_layout(_load(args), dry_run=args.dry_run, root=args.root)
    except (setup.SetupError, OSError) as e:
        print(f"oomguard setup: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from oomguard.cli import doctor

    findings = doctor.run(args.config)
    if args.json:
        _json([f.__dict__ for f in findings])
    else:
        for f in findings:
            print(f"{f.level.upper():<6} {f.topic:<12} {f.text}")
    return 1 if any(f.level == "error" for f in findings) else 0


def cmd_settings(args: argparse.Namespace) -> int:
    if args.value is not None:
        reply = request("settings", _socket(args), name=args.name, value=args.value)
    else:
        reply = request("settings", _socket(args))
    settings = reply["settings"]
    if args.name is not None and args.name not in settings:
        raise DaemonError(f"{args.name!r} is not a setting you may change (allowed: {', '.join(settings) or 'none'})")
    shown = {args.name: settings[args.name]} if args.name else settings
    if args.json:
        _json(shown)
    elif not shown:
        print("no settings: root allows none ([protect] user_settings)")
    else:
        for name, s in shown.items():
            print(f"{name} = {'on' if s['value'] else 'off'}  # {s['about']}; default {'on' if s['default'] else 'off'}")
    return 0


def cmd_motd(args: argparse.Namespace) -> int:
    from oomguard.cli import motd

    return motd.main(_socket(args))


def _socket(args: argparse.Namespace) -> str:
    try:
        return config.load(args.config).protect.socket
    except config.ConfigError:
        return config.DEFAULT_SOCKET


# ---------------------------------------------------------------- parser


def _global_options(p: argparse.ArgumentParser, default: object) -> None:
    p.add_argument("--version", action="version", version=f"oomguard {__version__}")
    p.add_argument("--config", metavar="PATH", default=default,
                   help=f"config file (default {config.DEFAULT_PATH})")  # fmt: skip


def _globals_after_commands(p: argparse.ArgumentParser) -> None:
    """Accept the global options after any (sub)command too: `oomguard daemon
    --config FILE` is how people write it. SUPPRESS as the default leaves the
    value given before the command in place when none comes after."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _global_options(sub, argparse.SUPPRESS)
                _globals_after_commands(sub)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oomguard", description="Tame the Linux OOM killer.")
    _global_options(p, None)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("daemon", help="run the root daemon in the foreground")
    s.set_defaults(func=cmd_daemon)

    s = sub.add_parser("runs", help="list protected runs (yours, or all as root), or report on one")
    s.add_argument("id", nargs="?", type=int, help="one run's report: duration, peak memory, OOM kills, its end")
    s.add_argument("--all", action="store_true", help="include ended runs")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_runs)

    s = sub.add_parser("kill-run", help="end one protected run as the healer would")
    s.add_argument("id", type=int)
    s.set_defaults(func=cmd_kill_run)

    s = sub.add_parser("status", help="memory, app slice, pressure, protected runs, health, healer, last OOM kills")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("top", help="processes in the order the OOM killer would pick them")
    s.add_argument("--cgroup", metavar="PATH", help="rank as the kernel does for an OOM inside this cgroup")
    s.add_argument("-n", "--limit", type=int, default=None, help="show the first N")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_top)

    s = sub.add_parser("events", help="kernel OOM kills, protected runs, healer actions, policy changes")
    s.add_argument("--since", metavar="WHEN", help='e.g. "1h", "30m", "2d" or an ISO time')
    s.add_argument("--kind", action="append", metavar="KIND",
                   help="oom_kill, oom_report, oom_livelock, grant, refusal, run_end, healer, storm, policy (repeatable)")
    s.add_argument("--limit", type=int, default=1000)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_events)

    s = sub.add_parser("policy", help="service priorities")
    psub = s.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    c = psub.add_parser("show", help="every classified process: class, value now, value wanted")
    c.add_argument("--all", action="store_true", help="include unmatched processes")
    c.add_argument("--classes", action="store_true", help="show the classes instead")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_policy_show)
    c = psub.add_parser("apply", help="apply the policy once")
    c.add_argument("--dry-run", action="store_true")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_policy_apply)

    s = sub.add_parser("setup", help="write the memory layout: app slice, service drop-ins, the daemon's unit")
    s.add_argument("--dry-run", action="store_true", help="print the files instead of writing them")
    s.add_argument("--root", metavar="DIR", help="write the files under DIR and do nothing else")
    s.add_argument("--uninstall", action="store_true",
                   help="stop the daemon and remove what setup wrote, restoring what it replaced")
    s.set_defaults(func=cmd_setup)

    s = sub.add_parser("doctor", help="what would undermine oomguard's guarantees on this host")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser("settings", help="your own settings, as root allows: show, or set NAME on|off")
    s.add_argument("name", nargs="?")
    s.add_argument("value", nargs="?", choices=("on", "off"))
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_settings)

    s = sub.add_parser("motd", help="what happened to your processes since your last login (for /etc/profile.d)")
    s.set_defaults(func=cmd_motd)

    s = sub.add_parser("config", help="configuration")
    csub = s.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    c = csub.add_parser("check", help="validate a config file")
    c.add_argument("path", nargs="?")
    c.set_defaults(func=cmd_config_check)
    c = csub.add_parser("show", help="the merged config (main file and drop-ins), each value with its file")
    c.add_argument("path", nargs="?")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_config_show)
    _globals_after_commands(p)
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
