"""`oomguard motd`: the caller's own notices, once, never in the way of a login."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest

from oomguard.cli import motd

ME, OTHER = os.getuid(), 4242
T0 = 1_700_000_000.0


def kill(victim_uid: int, runs=(), ts: float = T0) -> dict:
    return {"kind": "oom_kill", "ts": ts, "data": {
        "victim_uid": victim_uid, "victim_comm": "php-fpm8.2", "victim_pid": 77,
        "protected_runs": [{"id": r, "uid": ME} for r in runs]}}  # fmt: skip


def test_each_kind_of_notice_reads_as_a_sentence() -> None:
    events = [
        kill(ME),
        kill(OTHER, runs=[12]),
        {"kind": "healer", "ts": T0, "data": {"action": "killed", "run": 12, "command": "php bin/magento import",
                                               "reason": "shop down 5m past the grace"}},  # fmt: skip
        {"kind": "storm", "ts": T0, "data": {"action": "kill_nonessential",
                                              "killed": [{"pid": 9, "comm": "cron", "uid": ME}]}},  # fmt: skip
    ]
    text = motd.render(events, ME, T0 - 60)
    assert "killed your process php-fpm8.2 (pid 77)" in text
    assert "while your protected run 12 was alive" in text
    assert "the healer stopped your protected run 12 (php bin/magento import): shop down 5m past the grace" in text
    assert "the OOM-storm guard killed your process cron (9)" in text
    assert text.splitlines()[-1].startswith("  details: oomguard events --since ")


def test_nothing_happened_prints_nothing() -> None:
    quiet = [{"kind": "healer", "ts": T0, "data": {"action": "down"}}, kill(OTHER)]
    assert motd.render(quiet, ME, T0) == ""


def test_a_users_strings_cannot_drive_the_terminal() -> None:
    e = kill(ME)
    e["data"]["victim_comm"] = "x\x1b]0;pwned\x07\nroot# "
    line = motd.render([e], ME, T0)
    assert "\x1b" not in line and "\\x1b]0;pwned\\x07\\nroot# " in line


def test_many_notices_show_the_latest_and_say_how_many_more() -> None:
    text = motd.render([kill(ME, ts=T0 + n) for n in range(20)], ME, T0)
    assert f"... and {20 - motd.LINES_MAX} earlier" in text
    assert len([line for line in text.splitlines() if "killed your process" in line]) == motd.LINES_MAX


class FakeDaemon:
    """Answers `events` on a real Unix socket with the stored events since the asked time."""

    def __init__(self, path: Path, events: list[dict]):
        self.events, self.asked = events, []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                req = json.loads(conn.makefile().readline())
                self.asked.append(req)
                rows = [e for e in self.events if e["ts"] >= req["since"] and e["kind"] in req["kinds"]]
                conn.sendall(json.dumps({"ok": True, "events": rows}).encode())


def test_motd_shows_each_notice_once(tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture) -> None:
    import time

    monkeypatch.setenv("OOMGUARD_SOCKET", str(tmp_path / "sock"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    daemon = FakeDaemon(tmp_path / "sock", [kill(ME, ts=time.time() - 3600)])
    assert motd.main([]) == 0
    assert "killed your process php-fpm8.2" in capsys.readouterr().out
    assert (tmp_path / "state" / "oomguard" / "motd-seen").exists()
    assert motd.main([]) == 0
    assert capsys.readouterr().out == ""  # already shown
    assert daemon.asked[1]["since"] > daemon.asked[0]["since"]
    daemon.sock.close()


def test_no_daemon_means_silence_and_success(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("OOMGUARD_SOCKET", str(tmp_path / "nothing-here"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert motd.main([]) == 0
    assert capsys.readouterr() == ("", "")
    assert not (tmp_path / "state" / "oomguard" / "motd-seen").exists()  # not seen: shown next time
