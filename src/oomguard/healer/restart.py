"""Restarting the configured services: one try runs every restart command.

A try runs in a thread of its own (``background``), so the healer's tick
never waits on a slow restart; ``take()`` hands over the results once the
try is done. Inline (``background=False``) is for tests with a fake clock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from oomguard.config import Service
from oomguard.healer import commands

RunCommand = Callable[..., commands.CommandResult]


class Restarter:
    def __init__(
        self,
        services: Sequence[Service],
        run_command: RunCommand = commands.run_command,
        timeout: float = 120.0,
        background: bool = True,
    ):
        self.services = tuple(services)
        self.run_command = run_command
        self.timeout = timeout
        self.background = background
        self._result: list[dict] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Begin one try; its results wait in take()."""
        self._result = None
        if self.background:
            self._thread = threading.Thread(target=self._run, name="healer-restart", daemon=True)
            self._thread.start()
        else:
            self._run()

    def take(self) -> list[dict] | None:
        """The finished try's results, once (None while it runs)."""
        results, self._result = self._result, None
        if results is not None:
            self._thread = None
        return results

    def _run(self) -> None:
        results = []
        for svc in self.services:
            # kill_group=False: the service the command starts may share its
            # process group and must survive a slow restart command.
            r = self.run_command(list(svc.restart), self.timeout, oom_score_adj=0, kill_group=False)
            results.append(
                {
                    "service": svc.name,
                    "ok": r.ok,
                    "returncode": r.returncode,
                    "timed_out": r.timed_out,
                    "output": r.output[:300],
                }
            )
        self._result = results
