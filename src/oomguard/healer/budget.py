"""Ending a protected run that hit its memory budget (oom-protect --memory-max).

At its budget the kernel's OOM killer cannot take any of the run's tasks
(they are all at -1000), so the run's cgroup livelocks: every allocation
retries, and the kernel logs "no killable processes" for that cgroup many
times a second. The kernel log watch hands each such cgroup here; a run
whose own cgroup it is, with a budget, is ended at once (SIGTERM, then
SIGKILL without waiting), on a thread of its own so that the log watch
never waits on the kill. The run's end reason, its terminal and the
events say "exceeded its 2G budget".
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from oomguard.config import format_size
from oomguard.runs.registry import RunRegistry
from oomguard.runs.run import Run, budget_of

log = logging.getLogger(__name__)

TERM_TIMEOUT = 0.5  # a livelocked run cannot clean up much; the shop waits meanwhile


def over_budget(run: Run) -> str:
    """The run's end reason."""
    budget = budget_of(run)
    return f"exceeded its {format_size(budget)} budget" if budget is not None else "exceeded its budget"


class BudgetWatch:
    """``end(run, reason, why, term_timeout)`` ends one run and blocks
    (the healer's kill_run)."""

    def __init__(self, registry: RunRegistry, end: Callable[..., object]):
        self.registry = registry
        self.end = end
        self._lock = threading.Lock()
        self._ending: set[int] = set()

    def on_livelock(self, memcg: str | None) -> threading.Thread | None:
        """A livelock message for ``memcg``: the thread ending its run, if
        it is a budgeted run's own cgroup and not being ended already."""
        if not memcg:
            return None
        run = self.registry.by_cgroup(memcg)
        if run is None or budget_of(run) is None:
            return None
        with self._lock:
            if run.id in self._ending:
                return None  # the kernel repeats itself until the kill lands
            self._ending.add(run.id)
        thread = threading.Thread(target=self._end, args=(run,), name=f"budget-run-{run.id}", daemon=True)
        thread.start()
        return thread

    def _end(self, run: Run) -> None:
        reason = over_budget(run)
        why = f"run {run.id} {reason}"
        log.warning("%s: ending it (its cgroup %s livelocked at the budget)", why, run.cgroup)
        try:
            self.end(run, reason=reason, why=why, term_timeout=TERM_TIMEOUT)
        except Exception:
            log.exception("run %d: ending it over its budget failed", run.id)
        finally:
            with self._lock:
                self._ending.discard(run.id)
