"""The typed hooks through which the parts report their figures.

A part takes a ``Hooks`` and calls one method per figure; it never names a
metric. forensics/metrics.py's ``Metrics`` implements every method for the
exporter; ``NO_HOOKS`` ignores them all, for a part wired without metrics.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from oomguard.telemetry.reasons import RefusalReason


@runtime_checkable
class Hooks(Protocol):
    # the broker
    def grant(self) -> None: ...
    def refusal(self, reason: RefusalReason) -> None: ...

    # the healer
    def healer_action(self, action: str) -> None: ...
    def set_healer_down(self, down: bool) -> None: ...
    def set_downtime(self, seconds: float) -> None: ...
    def set_tick_seconds(self, seconds: float) -> None: ...

    # the storm guard, on the app cgroup's memory.events
    def set_oom_kill_rate(self, per_second: float) -> None: ...
    def set_healer_livelock(self, cgroup: str, active: bool) -> None: ...

    # the kernel log
    def oom_kill(self, comm: str | None, cgroup: str | None) -> None: ...
    def oom_livelock(self) -> None: ...
    def set_livelock(self, active: bool) -> None: ...
    def kmsg_lost(self, n: int) -> None: ...


class NoHooks:
    """Every figure ignored."""

    def grant(self) -> None:
        pass

    def refusal(self, reason: RefusalReason) -> None:
        pass

    def healer_action(self, action: str) -> None:
        pass

    def set_healer_down(self, down: bool) -> None:
        pass

    def set_downtime(self, seconds: float) -> None:
        pass

    def set_tick_seconds(self, seconds: float) -> None:
        pass

    def set_oom_kill_rate(self, per_second: float) -> None:
        pass

    def set_healer_livelock(self, cgroup: str, active: bool) -> None:
        pass

    def oom_kill(self, comm: str | None, cgroup: str | None) -> None:
        pass

    def oom_livelock(self) -> None:
        pass

    def set_livelock(self, active: bool) -> None:
        pass

    def kmsg_lost(self, n: int) -> None:
        pass


NO_HOOKS: Hooks = NoHooks()


class Unexported(NoHooks):
    """The daemon's figures when neither the exporter nor the textfile is
    configured: also ignores the daemon's own gauges, so that the exporter
    (prometheus_client, with the ssl it imports: about 8 MiB of the daemon's
    RSS) is never imported."""

    def before_scrape(self, sample: object) -> None:
        pass

    def set_app_memory(self, current: int | None, limit: int | None) -> None:
        pass

    def set_psi(self, some_avg10: float, full_avg10: float) -> None:
        pass

    def set_protected(self, n: int) -> None:
        pass
