"""The privileged act: -1000 for the pinned peer, and nothing else.

A grant has two halves. ``start`` is fast and runs on the broker's loop: the
allow-list, the pin, identity through the pinned fd (real, effective and saved
uids must all be the SO_PEERCRED uid), no other process sharing the peer's
mm, and admission by the run lifecycle. ``finish`` places the run (which may
wait seconds on systemd, so the broker can run it off the loop), records it,
writes -1000 through the pinned fd, and confirms the peer is still alive and
still alone in its mm. Kept apart from socket handling so tests can drive it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

from oomguard.broker import placement
from oomguard.broker.peer import GONE, Peer, is_allowed, refusal_text
from oomguard.broker.protocol import Refusal
from oomguard.config import ProtectConfig
from oomguard.host import cmdline, mm, procfs
from oomguard.host.pidfd import Pinned
from oomguard.runs.lifecycle import RunLifecycle, RunRefused
from oomguard.runs.registry import RunRegistry
from oomguard.runs.run import BUDGET, SCOPE_REFUSED, Run
from oomguard.telemetry.reasons import RefusalReason

log = logging.getLogger(__name__)

PROTECTED = -1000


def tty_path(tty_nr: int) -> str | None:
    """/dev/pts/N or /dev/ttyN from a stat tty_nr."""
    if tty_nr == 0:
        return None
    major, minor = os.major(tty_nr), os.minor(tty_nr)
    if 136 <= major <= 143:
        return f"/dev/pts/{(major - 136) * 256 + minor}"
    if major == 4:
        return f"/dev/tty{minor}" if minor < 64 else f"/dev/ttyS{minor - 64}"
    return None


# The asker is oom-protect itself (a Python script) about to exec CMD: its own
# interpreter, path and options say nothing that its owner would recognise.
_WRAPPER = re.compile(
    r"^(?:\S*/)?python3?(?:\.\d+)?(?: -\S+)* \S*/(?:hypernode-)?oom-protect"
    r"(?: (?:--report|--memory-max(?:=\S*| \S+)))*(?: --)? (?=\S)"
)


def without_wrapper(command: str) -> str:
    """The run's command as its owner typed it: CMD and its arguments."""
    return _WRAPPER.sub("", command, count=1)


@dataclass
class Pending:
    """A grant whose fast half passed: the run is reserved, not yet recorded."""

    peer: Peer
    run: Run  # its cgroup is filled in by the placement
    placement: placement.Placement

    @property
    def slow(self) -> bool:
        return self.placement.slow


class Granter:
    """``grant`` does both halves at once; the broker calls ``start`` and
    ``finish`` itself. ``sharers(pid)`` lists the other processes sharing
    pid's mm (host/mm.py; injectable for tests)."""

    def __init__(
        self,
        config: ProtectConfig,
        registry: RunRegistry,
        on_grant: Callable[[Run], None] = lambda run: None,
        on_refusal: Callable[[Peer, str, str], None] = lambda peer, reason, msg: None,
        sharers: Callable[[int], list[int]] = mm.mm_sharers,
    ):
        self.config = config
        self.registry = registry
        self.lifecycle = RunLifecycle(registry)
        self.on_grant = on_grant
        self.on_refusal = on_refusal
        self.sharers = sharers
        self._cmdline_readers = threading.BoundedSemaphore(8)
        # Grants between start and finish, so that two at once can neither
        # pass the per-uid cap together nor make two runs of one process.
        self._reserve_lock = threading.Lock()
        self._reserved: set[tuple[int, int]] = set()
        self._reserved_of: Counter[int] = Counter()

    def command_of(self, peer: Peer) -> str:
        """The peer's command line for the log: bounded in time and size,
        with a cap on readers stuck behind hostile processes."""
        if not self._cmdline_readers.acquire(blocking=False):
            return "<cmdline not read: too many pending reads>"
        try:
            return without_wrapper(cmdline.read_cmdline_bounded(peer.pid, peer.dirfd, timeout=0.2, limit=512))
        finally:
            self._cmdline_readers.release()

    # ------------------------------------------------------------ the halves

    def grant(self, peer: Peer, *, report: bool = False, memory_max: int | None = None) -> Run:
        started = self.start(peer, report=report, memory_max=memory_max)
        return started if isinstance(started, Run) else self.finish(started)

    def start(self, peer: Peer, *, report: bool = False, memory_max: int | None = None) -> Run | Pending:
        """The fast half: the run the peer already belongs to (asked again),
        or a reserved ``Pending``. Refusal otherwise, logged and reported.
        ``report``: tell the run's terminal its summary when it ends;
        ``memory_max``: the budget asked for (bytes), within [protect]'s."""
        return self._reported(peer, lambda: self._start(peer, report, memory_max))

    def finish(self, pending: Pending) -> Run:
        """The slow half; the reservation ends either way."""
        try:
            return self._reported(pending.peer, lambda: self._finish(pending))
        finally:
            self._release(pending.run)

    def cancel(self, pending: Pending) -> None:
        """A started grant that will not be finished (the peer went away)."""
        self._release(pending.run)

    def _reported(self, peer: Peer, step: Callable[[], Run | Pending]):
        try:
            try:
                return step()
            except RunRefused as r:
                raise Refusal(str(r), r.reason) from None
        except Refusal as r:
            log.warning(
                "refused protection: uid=%d user=%s pid=%d reason=%s: %s",
                peer.uid, peer.user, peer.pid, r.reason, r,
            )  # fmt: skip
            self.on_refusal(peer, r.reason, str(r))
            raise

    def _start(self, peer: Peer, report: bool = False, memory_max: int | None = None) -> Run | Pending:
        if not is_allowed(self.config, peer):
            raise Refusal(refusal_text(self.config, peer), RefusalReason.NOT_ALLOWED)
        try:
            budget = self.config.budget(memory_max)
        except ValueError as e:
            raise Refusal(str(e), RefusalReason.LIMIT) from None
        pinned = peer.pinned
        if peer.pin_error or pinned is None:
            raise Refusal(peer.pin_error or GONE, RefusalReason.GONE)
        try:
            status = pinned.read_status()
            st = pinned.read_stat()
            caller_cgroup = pinned.read_cgroup()
        except (ValueError, OSError):  # NoSuchProcess included
            raise Refusal(GONE, RefusalReason.GONE) from None
        if status.tgid != peer.pid:
            raise Refusal(GONE, RefusalReason.GONE)
        if set(status.uids[:3]) != {peer.uid}:
            raise Refusal(
                f"the requesting process changed identity (uids {status.uids[:3]}, connected as {peer.uid})",
                RefusalReason.IDENTITY,
            )
        self._refuse_shared_mm(peer)
        existing = self.lifecycle.admit(
            peer.uid, peer.pid, st.starttime, caller_cgroup, self.config.max_runs_per_uid
        )
        if existing is not None:
            return self._rejoin(peer, existing)  # never a second run nested in the first
        run_id = self.registry.new_id()
        run = Run(
            id=run_id,
            uid=peer.uid,
            user=peer.user,
            pid=peer.pid,
            starttime=st.starttime,
            started=time.time(),
            command=self.command_of(peer),
            cgroup=None,
            tty=tty_path(st.tty_nr),
            extra={"report": True} if report else {},
        )
        if budget is not None and not self.config.run_cgroups:
            raise Refusal("a memory budget needs a cgroup for the run, and [protect] run_cgroups is off",
                          RefusalReason.ERROR)  # fmt: skip
        where = placement.plan(run_id, peer.pid, caller_cgroup if self.config.run_cgroups else None, budget)
        if where.memory_max is not None:
            run = replace(run, extra={**run.extra, BUDGET: where.memory_max})
        self._reserve(run)  # the last step: from here on, finish or cancel releases it
        return Pending(peer, run, where)

    def _finish(self, pending: Pending) -> Run:
        peer, pinned = pending.peer, pending.peer.pinned
        if pinned is None:
            raise Refusal(GONE, RefusalReason.GONE)
        placed = pending.placement.place()
        run = replace(pending.run, cgroup=placed.cgroup)
        if placed.scope_refused is not None:  # said on the run, so its owner and the admin see why
            run = replace(run, extra={**run.extra, SCOPE_REFUSED: placed.scope_refused})
        # Registered before the write, under the registry's lock: the policy
        # checks protection under the same lock, so it can never overwrite
        # the -1000 with a class value it decided a moment earlier.
        with self.registry.lock:
            self.lifecycle.begin(run)
            try:
                self._write(peer, pinned)
            except Refusal:
                self.lifecycle.abandon(run)
                raise
        self.registry.flush()  # on disk before the reply, off the lock; a full disk is logged
        log.info(
            "granted protection: run=%d uid=%d user=%s pid=%d cgroup=%s command=%r",
            run.id, run.uid, run.user, run.pid, run.cgroup, run.command,
        )  # fmt: skip
        self.on_grant(run)
        return run

    def _rejoin(self, peer: Peer, run: Run) -> Run:
        """A process of an active run asked (again): it gets that run back,
        and the value the run's processes have; no new run, no new cgroup."""
        with self.registry.lock:
            self._write(peer, peer.pinned)  # type: ignore[arg-type]
        log.info("protection asked again: run=%d uid=%d pid=%d gets its run back", run.id, run.uid, peer.pid)
        return run

    # ------------------------------------------------------------ the write

    def _write(self, peer: Peer, pinned: Pinned) -> None:
        """-1000 through the pinned fd; then the peer must still be alive and
        alone in its mm (a CLONE_VM child made meanwhile would share the
        value), else the old value goes back."""
        try:
            before = pinned.read_oom_score_adj()
            pinned.write_oom_score_adj(PROTECTED)
            if pinned.exited():
                raise procfs.NoSuchProcess(peer.pid)
        except (ValueError, OSError) as e:
            if isinstance(e, ProcessLookupError | FileNotFoundError):
                raise Refusal(GONE, RefusalReason.GONE) from None
            why = getattr(e, "strerror", None) or str(e)
            raise Refusal(f"the broker could not set oom_score_adj: {why}", RefusalReason.ERROR) from None
        try:
            self._refuse_shared_mm(peer)
        except Refusal:
            try:
                pinned.write_oom_score_adj(before)  # raising a value needs no privilege
            except OSError as e:
                log.error("pid %d: could not restore oom_score_adj %d: %s", peer.pid, before, e)
            raise

    def _refuse_shared_mm(self, peer: Peer) -> None:
        """The kernel keeps oom_score_adj per mm: a grant to a process that
        shares its mm (CLONE_VM, not a thread) is a grant to the others too."""
        try:
            others = self.sharers(peer.pid)
        except procfs.NoSuchProcess:
            raise Refusal(GONE, RefusalReason.GONE) from None
        except OSError as e:
            raise Refusal(f"the broker cannot tell whether the process shares its memory: {e}",
                          RefusalReason.ERROR) from None  # fmt: skip
        if others:
            shown = ", ".join(map(str, sorted(others)[:8]))
            raise Refusal(
                f"the requesting process shares its memory (mm) with pid {shown}: "
                "protecting it would protect them too", RefusalReason.SHARED_MM,
            )  # fmt: skip

    # ------------------------------------------------------------ reservations

    def _reserve(self, run: Run) -> None:
        with self._reserve_lock:
            if run.key in self._reserved:
                raise Refusal("a grant for this process is already under way", RefusalReason.BUSY)
            reserved = self._reserved_of[run.uid]
            if reserved and self.registry.active_count(run.uid) + reserved >= self.config.max_runs_per_uid:
                raise Refusal(
                    f"uid {run.uid} already has {self.config.max_runs_per_uid} active or pending protected runs "
                    "(see [protect] max_runs_per_uid)", RefusalReason.LIMIT,
                )  # fmt: skip
            self._reserved.add(run.key)
            self._reserved_of[run.uid] += 1

    def _release(self, run: Run) -> None:
        with self._reserve_lock:
            if run.key in self._reserved:
                self._reserved.discard(run.key)
                self._reserved_of[run.uid] -= 1
                if not self._reserved_of[run.uid]:
                    del self._reserved_of[run.uid]
