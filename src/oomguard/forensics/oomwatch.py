"""Kernel OOM reports become attributed events.

Follows /dev/kmsg (host/kmsg.py), parses OOM reports (oomreport.py), and stores each kill with
the protected runs that were alive at that moment, so an app user can see
"your import was running when php-fpm was killed". The kmsg position is
stored in the same transaction as the event, so a restart neither loses nor
repeats a report.

The watcher is the one writer of the livelock gauge (``set_livelock``): the
kernel's own "Out of memory and no killable processes", in any cgroup,
whether or not the healer runs. It turns 1 at the first such report (not
only once the ring is drained, which a livelock flood can delay) and back
to 0 once none came for LivelockTracker's ``clear_after``. The storm
guard's memory.events verdict on the app cgroup is a figure of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from oomguard.forensics import oomreport
from oomguard.forensics.events import EventStore
from oomguard.host import kmsg
from oomguard.runs.registry import RunRegistry
from oomguard.telemetry.hooks import NO_HOOKS, Hooks

log = logging.getLogger(__name__)

# kernel timestamps turned into wall time drift a little (btime is whole seconds)
SLACK = 1.0
SAVE_EVERY = 1.0


class OomWatcher:
    def __init__(
        self,
        path: str,
        store: EventStore,
        registry: RunRegistry,
        hooks: Hooks = NO_HOOKS,
        on_event: Callable[[str, dict], None] | None = None,
        on_livelock: Callable[[str | None], None] | None = None,
    ):
        self.store = store
        self.registry = registry
        self.hooks = hooks
        self.on_event = on_event
        self.on_livelock = on_livelock  # every livelock message's cgroup, repeats included
        self.parser = oomreport.OomParser()
        self.livelocks = oomreport.LivelockTracker()
        seq = store.get_state("kmsg.seq")
        self.follower = kmsg.KmsgFollower(
            path,
            self.on_record,
            int(seq) if seq and seq.isdigit() else None,
            store.get_state("kmsg.boot_id"),
            on_lost=hooks.kmsg_lost,
            on_idle=self.on_idle,
        )
        self._saved = self.follower.start_after_seq  # the position the store holds for this boot
        self._next_save = 0.0

    def attribution(self, when: float | None) -> tuple[list[dict], list[int]]:
        """The protected runs alive at wall time ``when`` (now if unknown), and
        their owners. A report read late (after a restart) still names the
        runs of its moment, not those of the moment it was read."""
        if when is None:
            runs = [r for r in self.registry.active() if self.registry.alive(r)]
        else:
            runs = [
                r for r in self.registry.all()
                if r.started - SLACK <= when <= (r.ended if r.ended is not None else float("inf")) + SLACK
            ]  # fmt: skip
        return [{"id": r.id, "user": r.user, "uid": r.uid, "command": r.command} for r in runs], [
            r.uid for r in runs
        ]

    def on_record(self, rec: kmsg.KmsgRecord) -> None:
        self.handle(self.parser.feed(rec), rec.seq)

    def on_idle(self) -> bool:
        """The ring is drained: flush a report cut short. True while a report
        is open or a livelock is active, which need another look soon even
        if no record comes."""
        self.handle(self.parser.expire(kmsg.now_usec()), self.follower.last_seq)
        livelock = self.livelocks.active(time.monotonic())
        self.hooks.set_livelock(livelock)
        unsaved = not self.save_position()
        return self.parser.pending or livelock or unsaved

    def save_position(self, force: bool = False) -> bool:
        """Persist the position after the last record read, if it moved.
        False while a save is due but held back by ``SAVE_EVERY``."""
        seq = self.follower.last_seq
        if seq is None:
            return True
        pos = self.parser.resume_after(seq)
        if pos == self._saved:
            return True
        now = time.monotonic()
        if not force and now < self._next_save:
            return False
        self._next_save = now + SAVE_EVERY
        try:
            self.store.set_states(self._position(pos))
        except Exception as e:  # noqa: BLE001 - a full disk: the events stored so far hold their own position
            log.warning("cannot save the kernel log position (%s): a restart may read repeats again", e)
            return True
        self._saved = pos
        return True

    def _position(self, pos: int) -> dict[str, str]:
        """The state keys a restart resumes from (host/kmsg.py skips up to ``pos`` in the same boot)."""
        return {"kmsg.seq": str(pos), "kmsg.boot_id": self.follower.boot_id or ""}

    def handle(self, events: list, seq: int | None) -> None:
        for ev in events:
            kind = ev.kind
            if kind == "oom_kill" and ev.victim_pid is None:
                # The report's tail was lost (ring overrun in a livelock flood):
                # an OOM happened, but it names no victim, so it is no kill.
                kind = "oom_report"
            data = ev.to_dict()
            data.pop("raw", None)
            runs, owners = self.attribution(ev.wall_time)
            data["protected_runs"] = runs
            uids = set(owners)
            if kind == "oom_kill":
                if ev.victim_uid is not None:
                    uids.add(ev.victim_uid)
                self.hooks.oom_kill(ev.victim_comm, ev.task_memcg or ev.oom_memcg)
                log.warning(
                    "kernel OOM kill: pid=%s comm=%s uid=%s memcg=%s, protected runs alive: %s",
                    ev.victim_pid, ev.victim_comm, ev.victim_uid, ev.oom_memcg,
                    [r["id"] for r in runs] or "none",
                )  # fmt: skip
            elif kind == "oom_livelock":
                self.hooks.oom_livelock()
                if self.on_livelock is not None:
                    self.on_livelock(ev.oom_memcg)
                # on the kernel's clock (CLOCK_MONOTONIC, as time.monotonic), so
                # a backlog read at once is judged by when it was printed
                now = time.monotonic()
                seen = self.livelocks.seen(ev, min(ev.ts_usec / 1e6, now))
                self.hooks.set_livelock(self.livelocks.active(now))
                if not seen:
                    continue  # one stored per cgroup per minute; the kernel repeats it
                data["suppressed_repeats"] = self.livelocks.take_suppressed(ev.oom_memcg)
            pos = None if seq is None else self.parser.resume_after(seq)
            self.store.add(kind, data, ts=ev.wall_time, uids=sorted(uids),
                           state=None if pos is None else self._position(pos))  # fmt: skip
            if pos is not None:
                self._saved = pos
            if self.on_event:
                self.on_event(kind, data)

    def run(self, stop: threading.Event) -> None:
        try:
            self.follower.run(stop)
        except OSError as e:
            log.warning("cannot follow the kernel log %s (%s): OOM kills will not be recorded", self.follower.path, e)
        finally:
            self.save_position(force=True)
