"""What the healer did and decided: kept for its status, stored as events,
counted in the metrics.

``ActionLog.record(kind, data, uids)`` is the one way the healer and the
storm guard report an action or a finding: the entry is stamped with the
wall time (and ``dry_run`` when nothing was really done), kept among the
last few for ``oomguard status`` and emitted to the event store; actions are
also counted by name through the hooks.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterable

from oomguard.healer.incident import KEEP_ACTIONS
from oomguard.telemetry.hooks import Hooks

log = logging.getLogger(__name__)

EmitFn = Callable[[str, dict, list[int]], None]
# Kinds that are actions (an "oom_livelock" record is a finding, not one).
ACTION_KINDS = frozenset({"healer", "storm"})


def decide(logger: logging.Logger, dry_run: bool, message: str, *args: object) -> None:
    """Log one decision with its reason, at WARNING (dry-run prefixes it)."""
    logger.warning(("dry-run: " if dry_run else "") + message, *args)


class ActionLog:
    """``emit(kind, data, uids)`` stores an event; ``dry_run()`` says whether
    the healer acts for real right now; ``wall()`` is wall time."""

    def __init__(
        self,
        emit: EmitFn,
        hooks: Hooks,
        dry_run: Callable[[], bool],
        wall: Callable[[], float],
        earlier: Iterable[dict] = (),
    ):
        self._emit = emit
        self._hooks = hooks
        self._dry_run = dry_run
        self._wall = wall
        self._lock = threading.Lock()
        self._last: collections.deque[dict] = collections.deque(earlier, maxlen=KEEP_ACTIONS)

    def record(
        self, kind: str, data: dict, uids: Iterable[int] = (), dry_run: bool | None = None
    ) -> dict:
        """Keep, emit and count one action; returns the entry."""
        entry = {"kind": kind, "at": self._wall(), **data}
        if self._dry_run() if dry_run is None else dry_run:
            entry["dry_run"] = True
        with self._lock:
            self._last.append(entry)
        try:
            self._emit(kind, entry, sorted(set(uids)))
        except Exception:  # noqa: BLE001 - a broken event store must not stop healing
            log.exception("emit(%s) failed", kind)
        if kind in ACTION_KINDS:
            try:
                self._hooks.healer_action(str(data.get("action", kind)))
            except Exception:  # noqa: BLE001 - nor a broken metric
                log.exception("the healer_action hook failed")
        return entry

    def last(self) -> list[dict]:
        with self._lock:
            return list(self._last)
