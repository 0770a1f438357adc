"""[[notify.exec]]: run a command for an event.

No shell: the command is an argv. It runs as the hook's unprivileged user
and group with no supplementary groups, in its own session (so a timeout
kills everything it started), with a fixed environment, the event as JSON on
stdin, and at most ``per_minute`` starts in any 60 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from oomguard.config.notify import ExecHook
from oomguard.notify.payload import body, environment

STDERR_TAIL = 512
POLL = 0.5  # how soon a hook notices that the daemon stops


class HookError(RuntimeError):
    """The hook ran but did not succeed (or was not run)."""


class ExecDelivery:
    def __init__(self, hook: ExecHook, clock: Callable[[], float] = time.monotonic):
        self.hook = hook
        self.rate_limited = 0
        self._clock = clock
        self._starts: deque[float] = deque()

    def __call__(self, event: dict[str, Any], stopping: threading.Event) -> None:
        self._take_slot()
        with tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(
                    list(self.hook.command),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    env=environment(event),
                    user=self.hook.uid,
                    group=self.hook.gid,
                    extra_groups=[],
                    cwd="/",
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as e:
                raise HookError(f"cannot run {self.hook.command[0]}: {e.strerror or e}") from None
            try:
                self._wait(proc, body(event), stopping)
            except BaseException:
                _kill_session(proc)
                raise
            if proc.returncode != 0:
                err.seek(max(0, err.seek(0, os.SEEK_END) - STDERR_TAIL))
                tail = err.read().decode(errors="replace").strip()
                raise HookError(f"{self.hook.command[0]} exited {proc.returncode}: {tail}")

    def _wait(self, proc: subprocess.Popen, data: bytes, stopping: threading.Event) -> None:
        """Feed and wait for the hook, in slices, so a daemon that stops
        never waits out a hook's whole timeout."""
        deadline = time.monotonic() + self.hook.timeout
        feed: bytes | None = data
        while True:
            left = deadline - time.monotonic()
            try:
                proc.communicate(feed, timeout=max(0.01, min(POLL, left)))
                return
            except subprocess.TimeoutExpired:
                feed = None  # communicate keeps what it has not written yet
                if stopping.is_set():
                    raise HookError(f"{self.hook.command[0]} killed: the daemon is stopping") from None
                if left <= POLL:
                    raise HookError(f"{self.hook.command[0]} killed after {self.hook.timeout:g} s") from None

    def _take_slot(self) -> None:
        now = self._clock()
        while self._starts and now - self._starts[0] >= 60.0:
            self._starts.popleft()
        if len(self._starts) >= self.hook.per_minute:
            self.rate_limited += 1
            raise HookError(f"rate limit: {self.hook.per_minute} runs a minute")
        self._starts.append(now)


def _kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
