"""The systemd watchdog, fed by the healer's tick.

A daemon at -1000 that stops healing must not look alive: keep-alives go
out only while the healer's tick keeps coming, so a wedged healer (a probe
stuck in the kernel, a deadlock) gets the daemon restarted by systemd
(``WatchdogSec=``). Without a healer, being scheduled is enough.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from oomguard.host.sdnotify import Notifier

log = logging.getLogger(__name__)


class Liveness:
    def __init__(
        self,
        notifier: Notifier,
        *,
        watch_ticks: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.notifier = notifier
        self.watch_ticks = watch_ticks
        self.period = notifier.watchdog_seconds  # None: no watchdog asked for
        self._clock = clock
        self._last_tick = clock()
        self._stalled = False

    def tick(self) -> None:
        """The healer finished a tick."""
        self._last_tick = self._clock()

    def alive(self) -> bool:
        if not self.watch_ticks or self.period is None:
            return True
        return self._clock() - self._last_tick <= self.period

    def beat(self) -> bool:
        """Send one keep-alive if the healer is alive; True if one was sent."""
        if self.alive():
            if self._stalled:
                log.warning("healer ticking again; watchdog keep-alives resume")
                self._stalled = False
            return self.notifier.watchdog()
        if not self._stalled:
            log.error("healer tick stalled for %.0f s: no watchdog keep-alive, systemd will restart the daemon",
                      self._clock() - self._last_tick)  # fmt: skip
            self._stalled = True
        return False

    def run(self, stop: threading.Event) -> None:
        if self.period is None:
            return
        while not stop.wait(self.period / 3):  # sd_watchdog_enabled(3): well within the period
            self.beat()


class TickWatch:
    """The healer's hooks, passed through, with each finished tick (its
    ``set_tick_seconds``) also told to the liveness."""

    def __init__(self, hooks: object, liveness: Liveness):
        self._hooks = hooks
        self._liveness = liveness

    def set_tick_seconds(self, seconds: float) -> None:
        self._liveness.tick()
        self._hooks.set_tick_seconds(seconds)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._hooks, name)
