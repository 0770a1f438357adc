"""A real terminal for guest tests: a pty whose secondary side belongs to
the user, as a login gives it, made the controlling terminal of what runs
on it. What is written to it is collected by a thread."""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import termios
import threading
import time


class Terminal:
    """A pty whose secondary side belongs to the user, as a login gives it:
    the run's controlling terminal, read by a thread."""

    def __init__(self, uid: int):
        self.primary, self.secondary = os.openpty()
        os.chown(os.ttyname(self.secondary), uid, -1)
        self.text = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.primary, 4096)
            except OSError:
                return
            if not chunk:
                return
            self.text += chunk.decode(errors="replace")

    def popen(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        def controlling_tty() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        return subprocess.Popen(argv, env=env, stdin=self.secondary, stdout=self.secondary,
                                stderr=self.secondary, start_new_session=True,
                                preexec_fn=controlling_tty)  # fmt: skip

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """The first match of ``pattern`` in what the terminal got; on a
        timeout, the assertion shows that text."""
        deadline = time.monotonic() + timeout
        while (m := re.search(pattern, self.text)) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} on the terminal after {timeout} s; it got:\n{self.text}")
            time.sleep(0.05)
        return m

    def close(self) -> None:
        os.close(self.secondary)
        os.close(self.primary)
        self._reader.join(5)
