"""Config drop-ins: ``FILE.d/*.toml`` merged over ``FILE``, in lexical order.

A fleet templates a base file and layers a plan's overrides over it. Tables
merge key by key; any other value, arrays of tables included (the classes,
the checks), is replaced whole by the later file. Every leaf remembers the
file it came from, for ``oomguard config show`` and for errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

SUFFIX = ".toml"


def dropin_dir(main: Path) -> Path:
    return main.with_name(main.name + ".d")


def dropin_files(main: Path) -> list[Path]:
    """The drop-ins of ``main`` in the order they apply; hidden files and
    anything not ending in .toml (editor backups, .dpkg-old) are skipped."""
    d = dropin_dir(main)
    try:
        names = sorted(n for n in (e.name for e in d.iterdir()) if n.endswith(SUFFIX) and not n.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [d / n for n in names]


def merge(layers: list[tuple[str, Mapping[str, Any]]]) -> tuple[dict[str, Any], dict[str, str]]:
    """(merged data, dotted key -> the file its value came from)."""
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for source, layer in layers:
        _merge_into(data, layer, "", source, origins)
    return data, origins


def _merge_into(into: dict[str, Any], layer: Mapping[str, Any], prefix: str, source: str,
                origins: dict[str, str]) -> None:  # fmt: skip
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge_into(into[key], value, dotted + ".", source, origins)
            continue
        for old in [k for k in origins if k == dotted or k.startswith((dotted + ".", dotted + "["))]:
            del origins[old]
        into[key] = _copy(value)
        _record(value, dotted, source, origins)


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _record(value: Any, dotted: str, source: str, origins: dict[str, str]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _record(v, f"{dotted}.{k}", source, origins)
    elif isinstance(value, list) and any(isinstance(v, Mapping) for v in value):
        for i, v in enumerate(value):
            _record(v, f"{dotted}[{i}]", source, origins)
    else:
        origins[dotted] = source


def origin_of(key: str, origins: Mapping[str, str]) -> str | None:
    """The file behind ``key`` or behind the nearest key that contains it."""
    while key:
        if key in origins:
            return origins[key]
        found = [src for k, src in origins.items() if k.startswith((key + ".", key + "["))]
        if found:
            return found[-1]
        cut = max(key.rfind("."), key.rfind("["))
        key = key[:cut] if cut > 0 else ""
    return None


def flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Leaves as (dotted key, value), in file order."""
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out += flatten(value, dotted + ".")
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for i, v in enumerate(value):
                out += flatten(v, f"{dotted}[{i}].")
        else:
            out.append((dotted, value))
    return out
