"""printable(): user-controlled strings cannot drive root's terminal."""

from __future__ import annotations

import pytest

from oomguard.cli.terminal import printable


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("php-fpm: pool www", "php-fpm: pool www"),
        ("café ünïcode", "café ünïcode"),  # printable non-ASCII stays
        ("\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),  # retitle the terminal
        ("ok\x1b[2K\rroot 1 init", "ok\\x1b[2K\\rroot 1 init"),  # erase line, fake a row
        ("two\nlines", "two\\nlines"),
        ("tab\there", "tab\\there"),
        ("\x9b31m", "\\x9b31m"),  # the 8-bit CSI
        ("a\\x1b", "a\\\\x1b"),  # a literal backslash cannot fake an escape
        (b"bad\xff\xfeutf8".decode("utf-8", "surrogateescape"), "bad\\xff\\xfeutf8"),
        ("\u202etxt.exe", "\\u202etxt.exe"),  # right-to-left override
        ("zero\u200bwidth", "zero\\u200bwidth"),
    ],
)
def test_control_characters_and_bad_bytes_are_escaped(raw: str, shown: str) -> None:
    assert printable(raw) == shown


def test_non_strings_are_shown_as_text() -> None:
    assert printable(1234) == "1234" and printable(None) == "None"


def test_nothing_that_a_terminal_acts_on_survives() -> None:
    out = printable("".join(chr(c) for c in [*range(0x3000), *range(0xDC80, 0xDD00), *range(0xE000, 0x10000)]))
    assert all(c.isprintable() for c in out)
