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


HOSTILE = "evil\x1b]0;owned\x07\n  run 99 root"


def _clean(text: str) -> None:
    assert "\x1b" not in text and "\x07" not in text
    assert not any(line.strip().startswith("run 99 root") for line in text.splitlines())


def test_every_renderer_escapes_what_a_user_controls() -> None:
    from oomguard.cli import render
    from oomguard.forensics.ranking import Entry, Ranking

    kill = {"ts": 1.0, "kind": "oom_kill", "data": {"victim_pid": 7, "victim_comm": HOSTILE, "victim_uid": 1000,
                                                     "oom_memcg": "/app/" + HOSTILE,
                                                     "protected_runs": [{"id": 1, "user": HOSTILE}]}}
    run = {"id": 1, "user": HOSTILE, "pid": 2, "command": HOSTILE}
    outputs = [
        render.table([(HOSTILE, 1)], ("A", "B")),
        render.render_status({"memory": {}, "daemon": {"pid": 1, "process_events": "events"}, "runs": [run],
                              "healer": {"checks": {HOSTILE: {"detail": HOSTILE}}}, "last_oom_kills": [kill]}),
        render.table([(render.ago(e["ts"]), e["kind"], render.describe_event(e)) for e in (
            kill, {"ts": 1.0, "kind": "grant", "data": run},
            {"ts": 1.0, "kind": "policy", "data": {"pid": 3, "comm": HOSTILE}})], ("T", "K", "W")),
    ]
    entry = Entry(pid=5, uid=1000, user=HOSTILE, comm=HOSTILE, adj=0, rss_kb=100, oom_score=10, points=None,
                  killable=True, rank=1)
    outputs.append(render.format_ranking(Ranking(entries=[entry], cgroup=None, totalpages=1, page_size=4096)))
    for text in outputs:
        _clean(text)
        assert "evil\\x1b]0;owned\\x07\\n" in text, text
