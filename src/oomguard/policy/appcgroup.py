"""Moving the app user's processes into the app cgroup at birth, on a host
without systemd: a part of the ``Enforcer``."""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable

from oomguard.host import cgroups, procfs
from oomguard.policy.resolver import Resolver
from oomguard.policy.stats import EnforcerStats
from oomguard.runs.registry import RunRegistry

log = logging.getLogger("oomguard.policy.enforcer")  # one logger for the enforcer's parts


class AppPlacement:
    """The placing half of the Enforcer; the attributes are the Enforcer's."""

    _lock: threading.RLock
    registry: RunRegistry | None
    app_cgroup: str | None
    app_uid: int | None
    dry_run: bool
    stats: EnforcerStats
    _resolver: Callable[..., Resolver]

    def place(self, pid: int) -> bool:
        """Move an app-user process into the app cgroup; True if moved.

        Only at birth does this keep the books right: memory a process has
        already been charged stays charged to the cgroup it came from (cgroup
        v2 does not move charges), so a process that grew elsewhere keeps
        that memory outside the app limit until it frees it."""
        proc = procfs.snapshot(pid)
        if proc is None:
            return False
        with self._lock:
            if self.registry is not None and self._resolver().protected(proc):
                return False
            return self._place(proc)

    def _place(self, proc: procfs.Proc) -> bool:
        target = self.app_cgroup
        if target is None or self.app_uid is None or proc.uid != self.app_uid:
            return False
        cg = proc.cgroup or "/"
        if cg == target or cg.startswith(target + "/"):
            return False
        if self.dry_run:
            return True
        try:
            cgroups.move(proc.pid, target)
        except (*procfs.GONE, ProcessLookupError):
            return False
        except OSError as e:
            if e.errno == errno.ESRCH:
                return False
            self.stats.place_errors += 1
            log.warning("policy: cannot move pid %d into %s: %s", proc.pid, target, e)
            return False
        self.stats.placed += 1
        return True


__all__ = ["AppPlacement"]
