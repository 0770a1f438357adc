"""One computation shared by every caller within a moment.

``status`` costs a wait on the healer's lock, a check of each protected
process and, where the policy is not on process events, a walk of /proc;
many users asking at once must cost one of each, not one each. ``Brief(fn, ttl)`` returns
the value computed less than ``ttl`` seconds ago, or computes it once while
concurrent callers wait for that one result.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Brief(Generic[T]):
    def __init__(self, compute: Callable[[], T], ttl: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.compute = compute
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()  # held while computing: the others wait for it
        self._value: T | None = None
        self._at = float("-inf")

    def get(self) -> T:
        with self._lock:
            if self._value is None or self.clock() - self._at >= self.ttl:
                self._value = self.compute()
                self._at = self.clock()
            return self._value
