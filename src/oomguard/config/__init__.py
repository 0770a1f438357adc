"""The TOML configuration: parsing, defaults and validation.

Every error names the offending key (``healer.window[1].from: ...``) so that an
operator can fix the file without reading a traceback. Nothing here touches the
system beyond reading the config file and the user/group databases.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import time as dtime
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path("/etc/oomguard/oomguard.toml")
DEFAULT_SOCKET = "/run/oomguard/protect.sock"
OOM_SCORE_ADJ_MIN = -1000
OOM_SCORE_ADJ_MAX = 1000


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key."""


# ---------------------------------------------------------------- scalars

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_duration(value: Any, key: str = "duration") -> float:
    """Seconds from ``"90s"``, ``"3m"``, ``"1h"``, ``"250ms"`` or a bare number."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration like \"90s\" or \"3m\", got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ConfigError(f"{key}: expected a duration like \"90s\" or \"3m\", got {value!r}")
    if seconds < 0:
        raise ConfigError(f"{key}: a duration cannot be negative")
    return seconds


def parse_size(value: Any, key: str = "size") -> int:
    """Bytes from ``"512M"``, ``"2GiB"`` or a bare integer."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        unit = (m.group(2) or "").upper().rstrip("B").rstrip("I") or ""
        return int(float(m.group(1)) * _SIZE_UNITS[unit or ""])
    raise ConfigError(f"{key}: expected a size like \"512M\" or \"2G\", got {value!r}")


def parse_clock(value: Any, key: str) -> dtime:
    if isinstance(value, str) and re.fullmatch(r"\d{1,2}:\d{2}", value):
        hour, minute = (int(p) for p in value.split(":"))
        if hour < 24 and minute < 60:
            return dtime(hour, minute)
    raise ConfigError(f"{key}: expected a time of day like \"23:00\", got {value!r}")


def resolve_user(name: Any, key: str) -> int:
    """A uid from a user name or number; unknown names are a config error."""
    if isinstance(name, int) and not isinstance(name, bool) and name >= 0:
        return name
    if isinstance(name, str) and name:
        if name.isdigit():
            return int(name)
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            raise ConfigError(f"{key}: unknown user {name!r}") from None
    raise ConfigError(f"{key}: expected a user name or uid, got {name!r}")


def resolve_group(name: Any, key: str) -> int:
    if isinstance(name, int) and not isinstance(name, bool) and name >= 0:
        return name
    if isinstance(name, str) and name:
        if name.isdigit():
            return int(name)
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            raise ConfigError(f"{key}: unknown group {name!r}") from None
    raise ConfigError(f"{key}: expected a group name or gid, got {name!r}")


def login_uid_range(login_defs: Path = Path("/etc/login.defs")) -> tuple[int, int]:
    """(UID_MIN, UID_MAX) of regular login users, Debian's defaults if unset."""
    lo, hi = 1000, 60000
    try:
        text = login_defs.read_text(errors="replace")
    except OSError:
        return lo, hi
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            if parts[0] == "UID_MIN":
                lo = int(parts[1])
            elif parts[0] == "UID_MAX":
                hi = int(parts[1])
    return lo, hi


# ---------------------------------------------------------------- table reader


class _Table:
    """A view on one TOML table that records which keys were read."""

    def __init__(self, data: Any, key: str):
        if not isinstance(data, Mapping):
            raise ConfigError(f"{key}: expected a table, got {type(data).__name__}")
        self.data = data
        self.key = key
        self.seen: set[str] = set()

    def k(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def get(self, name: str, default: Any, kind: type | tuple[type, ...] | None = None) -> Any:
        self.seen.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        if kind is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(t.__name__ for t in kind)
            raise ConfigError(f"{self.k(name)}: expected {names}, got {value!r}")
        return value

    def str_list(self, name: str) -> tuple[str, ...]:
        value = self.get(name, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{self.k(name)}: expected a list of strings, got {value!r}")
        return tuple(value)

    def items(self, name: str) -> list[Any]:
        """A list, where a lone value counts as a list of one."""
        value = self.get(name, [])
        return value if isinstance(value, list) else [value]

    def duration(self, name: str, default: float) -> float:
        return parse_duration(self.get(name, default), self.k(name))

    def sub(self, name: str) -> _Table:
        self.seen.add(name)
        return _Table(self.data.get(name, {}), self.k(name))

    def array(self, name: str) -> list[_Table]:
        self.seen.add(name)
        items = self.data.get(name, [])
        if not isinstance(items, list):
            raise ConfigError(f"{self.k(name)}: expected an array of tables ([[{self.k(name)}]])")
        return [_Table(item, f"{self.k(name)}[{i}]") for i, item in enumerate(items)]

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(f"{self.k(unknown[0])}: unknown key")


# ---------------------------------------------------------------- sections


@dataclass(frozen=True)
class ProtectConfig:
    socket: str = DEFAULT_SOCKET
    # None means the default: regular login users (UID_MIN..UID_MAX).
    allow_uids: frozenset[int] | None = None
    allow_gids: frozenset[int] = frozenset()
    max_connections: int = 64
    max_connections_per_uid: int = 4
    request_timeout: float = 2.0
    run_cgroups: bool = True
    max_runs_per_uid: int = 64  # active runs one user may hold at once


@dataclass(frozen=True)
class PolicyClass:
    name: str
    oom_score_adj: int
    comm: tuple[str, ...] = ()  # globs on the kernel's comm (15 chars)
    exe: tuple[str, ...] = ()  # globs on /proc/<pid>/exe
    user: tuple[int, ...] = ()  # uids
    unit: tuple[str, ...] = ()  # systemd unit globs, read from the cgroup path
    cgroup: tuple[str, ...] = ()  # cgroup v2 path globs
    parent: tuple[str, ...] = ()  # names of classes the parent must be in
    essential: bool = True
    healer_exempt: bool = False

    @property
    def privileged(self) -> bool:
        """A class that makes a process harder to kill than the kernel default."""
        return self.oom_score_adj < 0 or self.healer_exempt


@dataclass(frozen=True)
class PolicyConfig:
    enforce: bool = True
    poll_interval: float = 2.0
    classes: tuple[PolicyClass, ...] | None = None  # None: the built-in defaults


@dataclass(frozen=True)
class LayoutConfig:
    app_user: str = "app"
    app_cgroup: str = "oomguard.app"  # cgroup v2 path, for hosts without systemd
    app_slice: str = "oomguard-app.slice"
    system_reserve: int = 512 << 20
    daemon_memory_min: int = 64 << 20
    services: tuple[str, ...] = ("nginx.service", "php8.2-fpm.service", "mariadb.service")


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


@dataclass(frozen=True)
class EventsConfig:
    db: str = "/var/lib/oomguard/events.db"
    max_age: float = 30 * 86400.0
    max_rows: int = 200_000
    kmsg: str = "/dev/kmsg"


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9464"  # "" turns the exporter off
    top_comms: int = 20


@dataclass(frozen=True)
class Config:
    protect: ProtectConfig = field(default_factory=ProtectConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    healer: HealerConfig = field(default_factory=HealerConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    state_dir: str = "/var/lib/oomguard"
    log_level: str = "info"
    source: str | None = None  # the file it came from, None for defaults


def _bounded_int(t: _Table, name: str, default: int, lo: int, hi: int) -> int:
    value = t.get(name, default, int)
    if not lo <= value <= hi:
        raise ConfigError(f"{t.k(name)}: must be between {lo} and {hi}, got {value}")
    return value


def _protect(t: _Table) -> ProtectConfig:
    socket = t.get("socket", DEFAULT_SOCKET, str)
    if not socket.startswith("/"):
        raise ConfigError(f"{t.k('socket')}: must be an absolute path")
    users = t.get("allow_users", None, list)
    groups = t.get("allow_groups", [], list)
    allow_uids = None
    if users is not None:
        allow_uids = frozenset(resolve_user(u, f"{t.k('allow_users')}[{i}]") for i, u in enumerate(users))
    allow_gids = frozenset(resolve_group(g, f"{t.k('allow_groups')}[{i}]") for i, g in enumerate(groups))
    cfg = ProtectConfig(
        socket=socket,
        allow_uids=allow_uids,
        allow_gids=allow_gids,
        max_connections=_bounded_int(t, "max_connections", 64, 1, 4096),
        max_connections_per_uid=_bounded_int(t, "max_connections_per_uid", 4, 1, 1024),
        request_timeout=t.duration("request_timeout", 2.0),
        run_cgroups=t.get("run_cgroups", True, bool),
        max_runs_per_uid=_bounded_int(t, "max_runs_per_uid", ProtectConfig.max_runs_per_uid, 1, 4096),
    )
    t.done()
    return cfg


def parse_policy_class(data: Any, key: str) -> PolicyClass:
    """One ``[[policy.class]]`` table; also used for the built-in defaults."""
    t = _Table(data, key)
    name = t.get("name", None, str)
    if not name:
        raise ConfigError(f"{t.k('name')}: every class needs a name")
    adj = t.get("oom_score_adj", None, int)
    if adj is None or not OOM_SCORE_ADJ_MIN <= adj <= OOM_SCORE_ADJ_MAX:
        raise ConfigError(f"{t.k('oom_score_adj')}: must be an integer from -1000 to 1000")
    cls = PolicyClass(
        name=name,
        oom_score_adj=adj,
        comm=t.str_list("comm"),
        exe=t.str_list("exe"),
        user=tuple(resolve_user(u, f"{t.k('user')}[{i}]") for i, u in enumerate(t.items("user"))),
        unit=t.str_list("unit"),
        cgroup=t.str_list("cgroup"),
        parent=t.str_list("parent"),
        essential=t.get("essential", True, bool),
        healer_exempt=t.get("healer_exempt", False, bool),
    )
    t.done()
    if not (cls.comm or cls.exe or cls.user or cls.unit or cls.cgroup or cls.parent):
        raise ConfigError(f"{key}: class {name!r} has no matcher and would match every process")
    if cls.privileged and not (cls.user and (cls.exe or cls.unit or cls.cgroup)):
        raise ConfigError(
            f"{key}: class {name!r} lowers oom_score_adj below 0 or exempts from the healer, "
            "so it must match on user together with exe, unit or cgroup (a name alone can be forged)"
        )
    return cls


def _policy(t: _Table) -> PolicyConfig:
    classes = None
    if "class" in t.data:
        classes = tuple(parse_policy_class(c.data, c.key) for c in t.array("class"))
        names = [c.name for c in classes]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"{t.k('class')}: duplicate class name {sorted(dup)[0]!r}")
        for i, c in enumerate(classes):
            for p in c.parent:
                if p not in names:
                    raise ConfigError(f"{t.k('class')}[{i}].parent: unknown class {p!r}")
    cfg = PolicyConfig(
        enforce=t.get("enforce", True, bool),
        poll_interval=t.duration("poll_interval", 2.0),
        classes=classes,
    )
    t.done()
    return cfg


def _layout(t: _Table) -> LayoutConfig:
    cgroup = t.get("app_cgroup", LayoutConfig.app_cgroup, str).strip("/")
    if not cgroup or ".." in cgroup.split("/"):
        raise ConfigError(f"{t.k('app_cgroup')}: must be a relative cgroup path like 'oomguard.app'")
    slice_ = t.get("app_slice", LayoutConfig.app_slice, str)
    if not slice_.endswith(".slice"):
        raise ConfigError(f"{t.k('app_slice')}: must end in .slice")
    cfg = LayoutConfig(
        app_user=t.get("app_user", LayoutConfig.app_user, str),
        app_cgroup=cgroup,
        app_slice=slice_,
        system_reserve=parse_size(t.get("system_reserve", "512M"), t.k("system_reserve")),
        daemon_memory_min=parse_size(t.get("daemon_memory_min", "64M"), t.k("daemon_memory_min")),
        services=t.str_list("services") if "services" in t.data else LayoutConfig.services,
    )
    if "app_user" in t.data:
        resolve_user(cfg.app_user, t.k("app_user"))
    t.done()
    return cfg


def _check(t: _Table) -> Check:
    name = t.get("name", None, str)
    if not name:
        raise ConfigError(f"{t.k('name')}: every check needs a name")
    kinds = [k for k in ("http", "tcp", "mysql", "command") if k in t.data]
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
    failures = _bounded_int(t, "failures", 2, 1, 1000)
    status = _bounded_int(t, "status", 200, 100, 599)
    interval = t.duration("interval", 5.0)
    timeout = t.duration("timeout", 3.0)
    if interval <= 0 or timeout <= 0:
        raise ConfigError(f"{t.key}: interval and timeout must be positive")
    t.done()
    return Check(name, kind, target, interval, timeout, failures, status)


def split_argv(command: str, key: str) -> tuple[str, ...]:
    """Shell-style word splitting, never a shell."""
    import shlex

    try:
        return tuple(shlex.split(command))
    except ValueError as e:
        raise ConfigError(f"{key}: cannot split {command!r}: {e}") from None


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


def _healer(t: _Table) -> HealerConfig:
    tz = t.get("timezone", "UTC", str)
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(tz)
    except Exception:
        raise ConfigError(f"{t.k('timezone')}: unknown timezone {tz!r}") from None
    windows = HealerConfig.windows
    if "window" in t.data:
        wins = []
        for w in t.array("window"):
            start = parse_clock(w.get("from", None), w.k("from"))
            end = parse_clock(w.get("to", None), w.k("to"))
            if start == end:
                raise ConfigError(f"{w.k('to')}: a window cannot start and end at the same time")
            wins.append(Window(start, end, parse_duration(w.get("grace", None), w.k("grace"))))
            w.done()
        windows = tuple(wins)
        if (pair := windows_overlap(windows)) is not None:
            raise ConfigError(f"{t.k('window')}: windows [{pair[0]}] and [{pair[1]}] overlap")
    checks = tuple(_check(c) for c in t.array("check"))
    names = [c.name for c in checks]
    if len(set(names)) != len(names):
        raise ConfigError(f"{t.k('check')}: check names must be unique")
    services = []
    for s in t.array("service"):
        name = s.get("name", None, str)
        if not name:
            raise ConfigError(f"{s.k('name')}: every service needs a name")
        restart = split_argv(s.get("restart", f"systemctl restart {name}", str), s.k("restart"))
        if not restart:
            raise ConfigError(f"{s.k('restart')}: empty command")
        services.append(Service(name, restart))
        s.done()
    cfg = HealerConfig(
        enabled=t.get("enabled", True, bool),
        grace=t.duration("grace", 180.0),
        timezone=tz,
        windows=windows,
        checks=checks,
        services=tuple(services),
        dry_run=t.get("dry_run", False, bool),
        term_timeout=t.duration("term_timeout", 10.0),
        restart_tries=_bounded_int(t, "restart_tries", 5, 1, 100),
        restart_backoff=t.duration("restart_backoff", 5.0),
        restart_backoff_max=t.duration("restart_backoff_max", 120.0),
        storm_kills_per_second=float(t.get("storm_kills_per_second", 5.0, (int, float))),
        permissive=t.get("permissive", False, bool),
    )
    if cfg.storm_kills_per_second <= 0:
        raise ConfigError(f"{t.k('storm_kills_per_second')}: must be positive")
    t.done()
    return cfg


def _events(t: _Table) -> EventsConfig:
    cfg = EventsConfig(
        db=t.get("db", EventsConfig.db, str),
        max_age=t.duration("max_age", EventsConfig.max_age),
        max_rows=_bounded_int(t, "max_rows", EventsConfig.max_rows, 100, 100_000_000),
        kmsg=t.get("kmsg", EventsConfig.kmsg, str),
    )
    t.done()
    return cfg


def _metrics(t: _Table) -> MetricsConfig:
    listen = t.get("listen", MetricsConfig.listen, str)
    if listen:
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{t.k('listen')}: expected host:port, got {listen!r}")
    cfg = MetricsConfig(listen=listen, top_comms=_bounded_int(t, "top_comms", 20, 1, 1000))
    t.done()
    return cfg


def parse(data: Mapping[str, Any], source: str | None = None) -> Config:
    """A Config from already-decoded TOML data."""
    top = _Table(data, "")
    daemon = top.sub("daemon")
    state_dir = daemon.get("state_dir", "/var/lib/oomguard", str)
    log_level = daemon.get("log_level", "info", str).lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"daemon.log_level: expected debug, info, warning or error, got {log_level!r}")
    daemon.done()
    cfg = Config(
        protect=_protect(top.sub("protect")),
        policy=_policy(top.sub("policy")),
        layout=_layout(top.sub("layout")),
        healer=_healer(top.sub("healer")),
        events=_events(top.sub("events")),
        metrics=_metrics(top.sub("metrics")),
        state_dir=state_dir,
        log_level=log_level,
        source=source,
    )
    top.done()
    return cfg


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the config; a missing default file means defaults, a missing
    explicit file or an invalid one is a ConfigError."""
    explicit = path is not None
    p = Path(path) if path is not None else DEFAULT_PATH
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{p}: no such config file") from None
        return Config()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    try:
        return parse(data, source=str(p))
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
