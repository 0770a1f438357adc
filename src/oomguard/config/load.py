"""The config file: read at once and whole, or refused with the file named.

Only a regular file of at most MAX_BYTES is read, and opening never blocks,
so a FIFO or a device given as the config fails at once instead of hanging
or filling memory.
"""

from __future__ import annotations

import errno
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oomguard.config import dropins
from oomguard.config.broker import ProtectConfig, parse_protect
from oomguard.config.events import EventsConfig, absolute_path, parse_events
from oomguard.config.healer import HealerConfig, parse_healer
from oomguard.config.layout import LayoutConfig, parse_layout
from oomguard.config.metrics import MetricsConfig, parse_metrics
from oomguard.config.notify import NotifyConfig, parse_notify
from oomguard.config.policy import PolicyConfig, parse_policy
from oomguard.config.table import Table
from oomguard.config.values import ConfigError

DEFAULT_PATH = Path("/etc/oomguard/oomguard.toml")
MAX_BYTES = 1 << 20
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Config:
    protect: ProtectConfig = field(default_factory=ProtectConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    healer: HealerConfig = field(default_factory=HealerConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    state_dir: str = "/var/lib/oomguard"
    log_level: str = "info"
    source: str | None = None  # the file it came from, None for defaults
    files: tuple[str, ...] = ()  # that file and the drop-ins merged over it


def parse(data: Mapping[str, Any], source: str | None = None, files: tuple[str, ...] = ()) -> Config:
    """A Config from already-decoded TOML data."""
    top = Table(data, "")
    daemon = top.sub("daemon", Config)
    state_dir = absolute_path(daemon, "state_dir")
    log_level = daemon.get("log_level", kind=str).lower()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"daemon.log_level: expected debug, info, warning or error, got {log_level!r}")
    daemon.done()
    cfg = Config(
        protect=parse_protect(top.sub("protect", ProtectConfig)),
        policy=parse_policy(top.sub("policy", PolicyConfig)),
        layout=parse_layout(top.sub("layout", LayoutConfig)),
        healer=parse_healer(top.sub("healer", HealerConfig)),
        events=parse_events(top.sub("events", EventsConfig)),
        metrics=parse_metrics(top.sub("metrics", MetricsConfig)),
        notify=parse_notify(top.sub("notify", NotifyConfig)),
        state_dir=state_dir,
        log_level=log_level,
        source=source,
        files=files,
    )
    top.done()
    return cfg


def read_config_file(p: Path) -> bytes:
    """The bytes of a regular file of at most MAX_BYTES; FileNotFoundError
    if absent, ConfigError (naming the file) for anything else."""
    try:
        # O_NONBLOCK: opening a FIFO with no writer would wait for one.
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket, or a FIFO on some systems
            raise ConfigError(f"{p}: not a regular file") from None
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{p}: not a regular file")
        if st.st_size > MAX_BYTES:
            raise ConfigError(f"{p}: {st.st_size} bytes; a config file is at most {MAX_BYTES} bytes")
        chunks, total = [], 0
        while chunk := os.read(fd, MAX_BYTES + 1 - total):
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_BYTES:  # it grew while we read
                raise ConfigError(f"{p}: more than {MAX_BYTES} bytes; a config file is at most that")
        return b"".join(chunks)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)


def _decode(p: Path, raw: bytes) -> dict[str, Any]:
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None


@dataclass(frozen=True)
class Layers:
    """The main file and its drop-ins, merged, before validation."""

    data: dict[str, Any]
    origins: dict[str, str]  # dotted key -> file
    files: tuple[str, ...]  # the files that exist, in the order they apply


def read_layers(p: Path, explicit: bool = True) -> Layers:
    """``p`` and ``p.d/*.toml``; a missing main file is an error only if it
    was named explicitly (its drop-ins still apply)."""
    layers: list[tuple[str, dict[str, Any]]] = []
    try:
        layers.append((str(p), _decode(p, read_config_file(p))))
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{p}: no such config file") from None
    for d in dropins.dropin_files(p):
        try:
            layers.append((str(d), _decode(d, read_config_file(d))))
        except FileNotFoundError:
            continue  # removed while we listed it
    data, origins = dropins.merge(layers)
    return Layers(data, origins, tuple(src for src, _ in layers))


def load_file(p: Path, explicit: bool = True) -> Config:
    """Load one config file and its drop-ins; an error names the file the
    offending key came from."""
    return load_layers(p, explicit)[0]


def load_layers(p: Path, explicit: bool = True) -> tuple[Config, Layers]:
    """The Config and the layers it was merged from (`config show`), read once."""
    layers = read_layers(p, explicit)
    if not layers.files:
        return Config(), layers
    try:
        return parse(layers.data, source=str(p), files=layers.files), layers
    except ConfigError as e:
        key = str(e).split(":", 1)[0]
        where = dropins.origin_of(key, layers.origins) if " " not in key else None
        raise ConfigError(f"{where or p}: {e}") from None
