"""``[healer]``: health checks, grace windows and the services to restart."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import time as dtime

from oomguard.config.table import Table, default_of
from oomguard.config.values import ConfigError, parse_clock, parse_duration, real_number, split_argv

CHECK_KINDS = ("http", "tcp", "mysql", "command")


@dataclass(frozen=True)
class Window:
    start: dtime
    end: dtime
    grace: float


@dataclass(frozen=True)
class Check:
    name: str
    kind: str  # http, tcp, mysql, command
    target: str
    interval: float = 5.0
    timeout: float = 3.0
    failures: int = 2
    expect_status: int = 200


@dataclass(frozen=True)
class Service:
    name: str
    restart: tuple[str, ...]


@dataclass(frozen=True)
class HealerConfig:
    enabled: bool = True
    grace: float = 180.0
    warn_before: float = 60.0  # the second warning to run owners, before the grace ends
    timezone: str = "UTC"
    windows: tuple[Window, ...] = (Window(dtime(23, 0), dtime(7, 0), 900.0),)
    checks: tuple[Check, ...] = ()
    services: tuple[Service, ...] = ()
    dry_run: bool = False
    term_timeout: float = 10.0
    restart_tries: int = 5
    restart_backoff: float = 5.0
    restart_backoff_max: float = 120.0
    storm_kills_per_second: float = 5.0
    permissive: bool = False


def windows_overlap(windows: tuple[Window, ...]) -> tuple[int, int] | None:
    """Indexes of two windows that share a minute of the day, if any."""

    def minutes(w: Window) -> set[int]:
        a = w.start.hour * 60 + w.start.minute
        b = w.end.hour * 60 + w.end.minute
        return set(range(a, b)) if a < b else set(range(a, 1440)) | set(range(0, b))

    spans = [minutes(w) for w in windows]
    for i in range(len(spans)):
        for j in range(i + 1, len(spans)):
            if spans[i] & spans[j]:
                return i, j
    return None


def _check(t: Table) -> Check:
    name = t.get("name", None, str)
    if not name:
        raise ConfigError(f"{t.k('name')}: every check needs a name")
    kinds = [k for k in CHECK_KINDS if k in t.data]
    if len(kinds) != 1:
        raise ConfigError(f"{t.key}: check {name!r} needs exactly one of http, tcp, mysql, command")
    kind = kinds[0]
    target = t.get(kind, None, str)
    if kind == "http" and not re.match(r"^https?://", target):
        raise ConfigError(f"{t.k('http')}: expected an http:// or https:// URL, got {target!r}")
    if kind == "tcp" and not re.match(r"^.+:\d+$", target):
        raise ConfigError(f"{t.k('tcp')}: expected host:port, got {target!r}")
    if kind == "command" and not split_argv(target, t.k("command")):
        raise ConfigError(f"{t.k('command')}: empty command")
    failures = t.bounded_int("failures", 1, 1000)
    status = t.bounded_int("status", 100, 599, field="expect_status")
    interval = t.duration("interval")
    timeout = t.duration("timeout")
    if interval <= 0 or timeout <= 0:
        raise ConfigError(f"{t.key}: interval and timeout must be positive")
    t.done()
    return Check(name, kind, target, interval, timeout, failures, status)


def _window(w: Table) -> Window:
    start = parse_clock(w.get("from", None), w.k("from"))
    end = parse_clock(w.get("to", None), w.k("to"))
    if start == end:
        raise ConfigError(f"{w.k('to')}: a window cannot start and end at the same time")
    if "grace" not in w.data:
        raise ConfigError(f"{w.k('grace')}: every window needs its grace, a duration like \"15m\"")
    window = Window(start, end, parse_duration(w.get("grace", None), w.k("grace")))
    w.done()
    return window


def _service(s: Table) -> Service:
    name = s.get("name", None, str)
    if not name:
        raise ConfigError(f"{s.k('name')}: every service needs a name")
    restart = split_argv(s.get("restart", f"systemctl restart {name}", str), s.k("restart"))
    if not restart:
        raise ConfigError(f"{s.k('restart')}: empty command")
    s.done()
    return Service(name, restart)


def _timezone(t: Table) -> str:
    tz = t.get("timezone", kind=str)
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(tz)
    except Exception:
        raise ConfigError(f"{t.k('timezone')}: unknown timezone {tz!r}") from None
    return tz


def parse_healer(t: Table) -> HealerConfig:
    tz = _timezone(t)
    windows: tuple[Window, ...] = default_of(HealerConfig, "windows")
    if "window" in t.data:
        windows = tuple(_window(w) for w in t.array("window"))
        if (pair := windows_overlap(windows)) is not None:
            raise ConfigError(f"{t.k('window')}: windows [{pair[0]}] and [{pair[1]}] overlap")
    checks = tuple(_check(c) for c in t.array("check", Check))
    names = [c.name for c in checks]
    if len(set(names)) != len(names):
        raise ConfigError(f"{t.k('check')}: check names must be unique")
    services = tuple(_service(s) for s in t.array("service"))
    storm = real_number(t.get("storm_kills_per_second", kind=(int, float)), t.k("storm_kills_per_second"))
    if storm <= 0:
        raise ConfigError(f"{t.k('storm_kills_per_second')}: must be positive")
    cfg = HealerConfig(
        enabled=t.get("enabled", kind=bool),
        grace=t.duration("grace"),
        warn_before=t.duration("warn_before"),
        timezone=tz,
        windows=windows,
        checks=checks,
        services=services,
        dry_run=t.get("dry_run", kind=bool),
        term_timeout=t.duration("term_timeout"),
        restart_tries=t.bounded_int("restart_tries", 1, 100),
        restart_backoff=t.duration("restart_backoff"),
        restart_backoff_max=t.duration("restart_backoff_max"),
        storm_kills_per_second=storm,
        permissive=t.get("permissive", kind=bool),
    )
    t.done()
    return cfg
