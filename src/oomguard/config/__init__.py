"""The TOML configuration: a schema module per part, one loader.

Every error names the offending key (``healer.window[1].from: ...``) and the
file, so that an operator can fix it without reading a traceback. The
dataclasses are the defaults. This package is the config's public face:
other layers import from ``oomguard.config``, not from its modules.

- ``values``: durations, sizes, times, users, globs; ``ConfigError``
- ``table``: the TOML table reader that knows each key's default
- ``broker`` ([protect]), ``policy`` ([policy], classes), ``layout``,
  ``healer``, ``events``, ``metrics``, ``notify``: one schema per part
- ``trusted_paths``: which exe globs a privileged class may use
- ``dropins``: ``FILE.d/*.toml`` merged over the file, each value's origin
- ``load``: the files, read safely, and the whole ``Config``
"""

from __future__ import annotations

import os
from pathlib import Path

from oomguard.config.broker import DEFAULT_SOCKET, ProtectConfig
from oomguard.config.events import EventsConfig
from oomguard.config.healer import Check, HealerConfig, Service, Window, windows_overlap
from oomguard.config.layout import LayoutConfig
from oomguard.config.load import (
    DEFAULT_PATH,
    MAX_BYTES,
    Config,
    Layers,
    load_file,
    load_layers,
    parse,
)
from oomguard.config.metrics import MetricsConfig, parse_listen
from oomguard.config.notify import ExecHook, NotifyConfig, WebhookHook
from oomguard.config.policy import (
    OOM_SCORE_ADJ_MAX,
    OOM_SCORE_ADJ_MIN,
    PolicyClass,
    PolicyConfig,
    parse_policy_class,
)
from oomguard.config.values import (
    ConfigError,
    format_size,
    parse_clock,
    parse_duration,
    parse_size,
    resolve_group,
    resolve_user,
    split_argv,
)
from oomguard.host.users import login_uid_range

__all__ = [
    "DEFAULT_PATH", "DEFAULT_SOCKET", "MAX_BYTES", "OOM_SCORE_ADJ_MAX", "OOM_SCORE_ADJ_MIN",
    "Check", "Config", "ConfigError", "Layers", "load_layers", "EventsConfig", "ExecHook", "NotifyConfig", "WebhookHook", "HealerConfig", "LayoutConfig", "MetricsConfig",
    "PolicyClass", "PolicyConfig", "ProtectConfig", "Service", "Window",
    "load", "login_uid_range", "parse", "parse_clock", "parse_duration", "parse_listen", "parse_policy_class",
    "format_size", "parse_size", "resolve_group", "resolve_user", "split_argv", "windows_overlap",
]  # fmt: skip


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the config; a missing default file means defaults, a missing
    explicit file or an invalid one is a ConfigError."""
    if path is None:
        return load_file(DEFAULT_PATH, explicit=False)
    return load_file(Path(path))
