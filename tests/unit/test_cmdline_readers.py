"""read_cmdline_bounded: stuck readers are bounded, not only waiting callers."""

from __future__ import annotations

import os
import threading

from oomguard.host import cmdline, procfs


def test_stuck_readers_hold_their_slots_until_they_return(monkeypatch) -> None:
    release = threading.Event()
    real = procfs.read_cmdline

    def stuck(pid, dir_fd=None, limit=4096):
        release.wait(30)  # as a read behind a held mmap lock does
        return real(pid, dir_fd, limit=limit)

    monkeypatch.setattr(procfs, "read_cmdline", stuck)
    before = threading.active_count()
    try:
        for _ in range(cmdline.CMDLINE_READERS):
            assert cmdline.read_cmdline_bounded(os.getpid(), timeout=0.01) == "<cmdline read timed out>"
        # every slot is held by a reader that is still stuck: no new thread
        assert cmdline.read_cmdline_bounded(os.getpid(), timeout=5) == "<cmdline not read: readers busy>"
        assert threading.active_count() - before == cmdline.CMDLINE_READERS
    finally:
        release.set()
    monkeypatch.setattr(procfs, "read_cmdline", real)
    for t in [t for t in threading.enumerate() if t.name.startswith("cmdline-")]:
        t.join(10)
    assert "pytest" in cmdline.read_cmdline_bounded(os.getpid(), timeout=5)  # slots are back
