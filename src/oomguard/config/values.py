"""Scalar values of the config file: durations, sizes, times of day, users,
groups, command lines and globs, each checked and named by its key.

``ConfigError`` is the one error of the config layer: its message starts with
the key (``healer.window[1].from: ...``), and ``load`` puts the file in front.
"""

from __future__ import annotations

import math
import re
import shlex
from datetime import time as dtime
from fnmatch import translate
from typing import Any

from oomguard.host import users


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_CLOCK = re.compile(r"\d{1,2}:\d{2}")
GLOB_MAGIC = "*?["


def finite(value: float, key: str) -> float:
    """``value`` if it is a real number; TOML's nan and inf are not."""
    if not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    return value


def real_number(value: int | float, key: str) -> float:
    """A finite float from a TOML number (an int may be too big for one)."""
    try:
        return finite(float(value), key)
    except OverflowError:
        raise ConfigError(f"{key}: {value} is out of range") from None


def parse_duration(value: Any, key: str = "duration") -> float:
    """Seconds from ``"90s"``, ``"3m"``, ``"1h"``, ``"250ms"`` or a bare number."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration like \"90s\" or \"3m\", got {value!r}")
    if isinstance(value, int | float):
        seconds = real_number(value, key)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ConfigError(f"{key}: expected a duration like \"90s\" or \"3m\", got {value!r}")
    finite(seconds, key)
    if seconds < 0:
        raise ConfigError(f"{key}: a duration cannot be negative")
    return seconds


def parse_size(value: Any, key: str = "size") -> int:
    """Bytes from ``"512M"``, ``"2GiB"`` or a bare integer."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        unit = (m.group(2) or "").upper().rstrip("B").rstrip("I") or ""
        size = float(m.group(1)) * _SIZE_UNITS[unit or ""]
        return int(finite(size, key))
    raise ConfigError(f"{key}: expected a size like \"512M\" or \"2G\", got {value!r}")


def format_size(size: int) -> str:
    """The shortest exact spelling parse_size reads back: 2G, 1536M, 4097K."""
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def parse_clock(value: Any, key: str) -> dtime:
    """A time of day from ``"23:00"``."""
    if isinstance(value, dtime):
        # TOML's bare 23:00:00 is a time literal; say how to write it.
        raise ConfigError(f"{key}: write the time of day as a quoted string, \"{value:%H:%M}\"")
    if isinstance(value, str) and _CLOCK.fullmatch(value):
        hour, minute = (int(p) for p in value.split(":"))
        if hour < 24 and minute < 60:
            return dtime(hour, minute)
    raise ConfigError(f"{key}: expected a time of day like \"23:00\", got {value!r}")


def _resolve(name: Any, key: str, lookup: Any, what: str) -> int:
    if isinstance(name, int) and not isinstance(name, bool) and name >= 0:
        return name
    if isinstance(name, str) and name:
        if name.isdigit():
            return int(name)
        number = lookup(name)
        if number is None:
            raise ConfigError(f"{key}: unknown {what} {name!r}")
        return number
    raise ConfigError(f"{key}: expected a {what} name or {what[0]}id, got {name!r}")


def resolve_user(name: Any, key: str) -> int:
    """A uid from a user name or number; unknown names are a config error."""
    return _resolve(name, key, users.uid_of, "user")


def resolve_group(name: Any, key: str) -> int:
    """A gid from a group name or number; unknown names are a config error."""
    return _resolve(name, key, users.gid_of, "group")


def split_argv(command: str, key: str) -> tuple[str, ...]:
    """Shell-style word splitting, never a shell."""
    try:
        return tuple(shlex.split(command))
    except ValueError as e:
        raise ConfigError(f"{key}: cannot split {command!r}: {e}") from None


def glob_min_length(glob: str) -> int:
    """The fewest characters any match of ``glob`` has; ConfigError-free,
    call check_glob first."""
    n, i, count = len(glob), 0, 0
    while i < n:
        c = glob[i]
        if c == "[":
            i = _class_end(glob, i)
        if c != "*":
            count += 1
        i += 1
    return count


def _class_end(glob: str, i: int) -> int:
    """Index of the ']' closing the class opened at ``i``, -1 if none; as
    fnmatch reads it (a ']' right after '[' or '[!' is a member)."""
    j = i + 1
    if j < len(glob) and glob[j] == "!":
        j += 1
    if j < len(glob) and glob[j] == "]":
        j += 1
    while j < len(glob) and glob[j] != "]":
        j += 1
    return j if j < len(glob) else -1


def check_glob(glob: str, key: str) -> str:
    """``glob`` if fnmatch can use it as written: fnmatch takes an unclosed
    '[' for a literal and an empty range for "never", both silently."""
    i = 0
    while i < len(glob):
        if glob[i] == "[":
            end = _class_end(glob, i)
            if end < 0:
                raise ConfigError(f"{key}: glob {glob!r} has a '[' without its ']' (write [[] for a literal '[')")
            i = end
        i += 1
    if "(?!)" in translate(glob):
        raise ConfigError(f"{key}: glob {glob!r} has an empty range and can never match")
    return glob


def is_glob(text: str) -> bool:
    return any(c in text for c in GLOB_MAGIC)
