"""Telling the run's owner on its terminal, never blocking and never writing to a terminal they do not own."""

from __future__ import annotations

import os
import pty
import threading

from healer_rig import NOBODY, Rig, add_run

from oomguard.healer import tty


def _pty_owned_by(uid: int):
    master, slave = pty.openpty()
    name = os.ttyname(slave)
    os.chown(name, uid, -1)
    return master, slave, name


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = b""
    try:
        while chunk := os.read(fd, 4096):
            out += chunk
    except BlockingIOError:
        pass
    return out


def test_the_owner_is_told_on_the_runs_terminal(tmp_path, procs):
    rig = Rig(tmp_path, term_timeout=0.3)
    master, slave, name = _pty_owned_by(NOBODY)
    try:
        p, _ = procs.start("exec sleep 1000")
        run = add_run(rig.registry, p.pid, tty=name)
        rec = rig.healer().kill_run(run, why="the shop was down for 3m05s")
        assert rec["told_tty"] is True
        text = _read_all(master).decode()
        assert f"protected run {run.id}" in text and "the shop was down for 3m05s" in text
    finally:
        os.close(master)
        os.close(slave)


def test_no_message_to_a_terminal_the_owner_does_not_own(tmp_path, procs):
    rig = Rig(tmp_path, term_timeout=0.3)
    master, slave, name = _pty_owned_by(0)
    try:
        p, _ = procs.start("exec sleep 1000")
        run = add_run(rig.registry, p.pid, tty=name)
        rec = rig.healer().kill_run(run)
        assert rec["told_tty"] is False
        assert _read_all(master) == b""
    finally:
        os.close(master)
        os.close(slave)


def test_tell_tty_never_blocks_on_a_full_terminal():
    master, slave, name = _pty_owned_by(NOBODY)
    try:
        os.set_blocking(slave, False)
        try:
            while True:
                os.write(slave, b"x" * 4096)  # nobody reads the master: fill it up
        except BlockingIOError:
            pass
        result = []
        t = threading.Thread(
            target=lambda: result.append(tty.tell_tty(name, NOBODY, "hello")), daemon=True
        )
        t.start()
        t.join(10)
        assert result, "tell_tty blocked on a full terminal"
    finally:
        os.close(master)
        os.close(slave)


def test_tell_tty_refuses_paths_that_are_not_terminals(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    assert not tty.tell_tty(str(f), 0, "x")
    assert not tty.tell_tty("/dev/pts/../../etc/passwd", 0, "x")
    assert f.read_text() == ""
