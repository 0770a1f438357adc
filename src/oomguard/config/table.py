"""A reader of one TOML table that names every key it refuses.

A table may be bound to the dataclass it fills (its *schema*): a key that is
absent then takes that dataclass field's default, so defaults are written
once, in the dataclasses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from oomguard.config.values import ConfigError, parse_duration

_SCHEMA = object()  # get(): take the default from the schema


def default_of(schema: type, name: str) -> Any:
    """The default of one field of a dataclass."""
    f = {f.name: f for f in dataclasses.fields(schema)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise KeyError(f"{schema.__name__}.{name} has no default")


class Table:
    """A view on one TOML table that records which keys were read."""

    def __init__(self, data: Any, key: str, schema: type | None = None):
        if not isinstance(data, Mapping):
            raise ConfigError(f"{key}: expected a table, got {type(data).__name__}")
        self.data = data
        self.key = key
        self.schema = schema
        self.seen: set[str] = set()

    def k(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def _default(self, name: str, field: str | None) -> Any:
        if self.schema is None:
            raise KeyError(f"{self.key}: no schema for the default of {name}")
        return default_of(self.schema, field or name)

    def get(
        self, name: str, default: Any = _SCHEMA, kind: type | tuple[type, ...] | None = None, *, field: str | None = None
    ) -> Any:
        """The value at ``name``; absent, ``default`` or the schema's field
        ``field`` (``name`` unless told) default."""
        self.seen.add(name)
        if name not in self.data:
            return self._default(name, field) if default is _SCHEMA else default
        value = self.data[name]
        if kind is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(t.__name__ for t in kind)
            raise ConfigError(f"{self.k(name)}: expected {names}, got {value!r}")
        return value

    def bounded_int(self, name: str, lo: int, hi: int, *, field: str | None = None) -> int:
        value = self.get(name, _SCHEMA, int, field=field)
        if not lo <= value <= hi:
            raise ConfigError(f"{self.k(name)}: must be between {lo} and {hi}, got {value}")
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

    def duration(self, name: str, default: Any = _SCHEMA, *, field: str | None = None) -> float:
        return parse_duration(self.get(name, default, field=field), self.k(name))

    def sub(self, name: str, schema: type | None = None) -> Table:
        self.seen.add(name)
        return Table(self.data.get(name, {}), self.k(name), schema)

    def array(self, name: str, schema: type | None = None) -> list[Table]:
        self.seen.add(name)
        items = self.data.get(name, [])
        if not isinstance(items, list):
            raise ConfigError(f"{self.k(name)}: expected an array of tables ([[{self.k(name)}]])")
        return [Table(item, f"{self.k(name)}[{i}]", schema) for i, item in enumerate(items)]

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(f"{self.k(unknown[0])}: unknown key")
