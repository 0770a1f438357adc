"""Settings a user may change for their own processes, as root allows.

Root lists the names in ``[protect] user_settings``; a user reads and
changes their own through the daemon's socket (identified by SO_PEERCRED, as
for grants). The one owner of ``settings.json`` in the state directory;
each change is written atomically before it is reported.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from oomguard.host import statefile

# name -> (what it does, its default)
KNOWN: dict[str, tuple[str, bool]] = {
    "permissive": ("the OOM-storm guard leaves your processes alone (the kernel's OOM killer does not)", False),
}
_TRUE, _FALSE = ("on", "true", "yes", "1"), ("off", "false", "no", "0")


class SettingError(ValueError):
    """A change that is not allowed or not understood; the message says why."""


def parse_value(name: str, text: Any) -> bool:
    if isinstance(text, bool):
        return text
    if isinstance(text, str) and text.lower() in _TRUE + _FALSE:
        return text.lower() in _TRUE
    raise SettingError(f"{name}: expected on or off, got {str(text)[:40]!r}")


class UserSettings:
    def __init__(self, path: str | os.PathLike[str], allowed: frozenset[str]):
        self.path = Path(path)
        self.allowed = allowed
        self._lock = threading.Lock()
        data = statefile.read_json(self.path, {}) or {}
        self._values: dict[int, dict[str, bool]] = {
            int(uid): {k: bool(v) for k, v in vals.items() if k in KNOWN}
            for uid, vals in data.items() if str(uid).isdigit() and isinstance(vals, dict)
        }  # fmt: skip

    def of(self, uid: int) -> dict[str, dict[str, Any]]:
        """Every setting this user may change: its value, default and meaning."""
        mine = self._values.get(uid, {})
        return {name: {"value": mine.get(name, KNOWN[name][1]), "default": KNOWN[name][1], "about": KNOWN[name][0]}
                for name in sorted(self.allowed)}  # fmt: skip

    def value(self, uid: int, name: str) -> bool:
        """In force for ``uid``: root may have withdrawn a name since it was set."""
        if name not in self.allowed:
            return KNOWN[name][1]
        return self._values.get(uid, {}).get(name, KNOWN[name][1])

    def change(self, uid: int, name: str, raw: Any) -> tuple[bool, bool]:
        """Set one; (old, new). SettingError if root does not allow it."""
        if name not in self.allowed:
            allowed = ", ".join(sorted(self.allowed)) or "none"
            raise SettingError(f"{name!r} is not a setting you may change (allowed: {allowed})")
        new = parse_value(name, raw)
        with self._lock:
            old = self.value(uid, name)
            values = {u: dict(v) for u, v in self._values.items()}
            values.setdefault(uid, {})[name] = new
            statefile.write_json_atomic(self.path, {str(u): v for u, v in values.items()})
            self._values = values
        return old, new
