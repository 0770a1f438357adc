"""Telling a run's owner on its terminal why the run was stopped."""

from __future__ import annotations

import os
import re
import stat

TTY_PATH = re.compile(r"/dev/(pts/\d+|tty\d+|ttyS\d+)")


def tell_tty(path: str, uid: int, text: str, limit: int = 400) -> bool:
    """Write one line to a run's terminal without ever blocking: O_NONBLOCK
    (a stopped or full tty gives EAGAIN and we give up), O_NOCTTY (never
    acquire it), one bounded write, and only to a terminal device that the
    run's owner owns (the path comes from the registry, not from the user)."""
    if not TTY_PATH.fullmatch(path):
        return False
    flags = os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISCHR(st.st_mode) or st.st_uid != uid:
            return False
        data = ("\r\n" + text.replace("\n", " ").strip()[:limit] + "\r\n").encode(
            "utf-8", "replace"
        )
        os.write(fd, data)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
