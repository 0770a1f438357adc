"""Text for a human's terminal from strings a user controls.

A comm, a command line, a unit name or a cgroup path is chosen by whoever
started the process, and may carry escape sequences that retitle root's
terminal, erase lines or fake output, newlines that forge table rows, or
bytes that are not UTF-8. ``printable`` escapes all of them the way
systemctl does (C-style ``\\xNN``), so what is shown is exactly what is there
and nothing more. ``--json`` output does not go through here: JSON escapes
on its own.
"""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def printable(value: object) -> str:
    """``value`` as text with every non-printable character escaped."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape(c) for c in text)


def _escape(c: str) -> str:
    if c in _NAMED:
        return _NAMED[c]
    if c.isprintable():
        return c
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
