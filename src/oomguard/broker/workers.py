"""A small bounded pool of threads that is fair between users.

The broker's loop hands every op that may take long (a query, a kill, a
systemd placement) to a pool, so the loop itself never waits. Each uid may
have at most ``per_uid`` jobs queued or running; a job past that is refused
at once (the caller answers BUSY). Queued jobs are taken round-robin across
uids, and ``per_uid`` is below the thread count, so however hard one user
hammers, another user's job finds a free thread.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable

log = logging.getLogger(__name__)



class WorkerPool:
    def __init__(self, name: str, threads: int = 3, per_uid: int = 2):
        if not 0 < per_uid or not 0 < threads:
            raise ValueError("a pool needs at least one thread and one job per uid")
        self.name = name
        self.threads = threads
        self.per_uid = per_uid
        self._cond = threading.Condition()
        self._queues: dict[int, deque[_Job]] = {}
        self._ring: deque[int] = deque()  # uids with queued jobs, in turn
        self._load: Counter[int] = Counter()  # queued + running, per uid
        self._workers: list[threading.Thread] = []
        self._stopping = False

    def submit(self, uid: int, work: Callable[[], object], deliver: Callable[[object], None] = lambda r: None) -> bool:
        """Queue ``work`` for ``uid``; False (not queued) past its cap. Its
        result goes to ``deliver`` once the uid's slot is free again, so a
        caller who sees the result may submit again at once."""
        job = _Job(work, deliver)
        with self._cond:
            if self._stopping or self._load[uid] >= self.per_uid:
                return False
            self._load[uid] += 1
            if uid not in self._queues:
                self._queues[uid] = deque()
                self._ring.append(uid)
            self._queues[uid].append(job)
            if len(self._workers) < self.threads:
                self._spawn()
            self._cond.notify()
        return True

    def load(self, uid: int) -> int:
        with self._cond:
            return self._load[uid]

    def stop(self, timeout: float = 5.0) -> None:
        """No new jobs; wait up to ``timeout`` for the threads to finish theirs."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            workers = list(self._workers)
        for t in workers:
            t.join(timeout)

    def _spawn(self) -> None:
        t = threading.Thread(target=self._work, name=f"{self.name}-{len(self._workers)}", daemon=True)
        self._workers.append(t)
        t.start()

    def _take(self) -> tuple[int, _Job] | None:
        with self._cond:
            while not self._ring:
                if self._stopping:
                    return None
                self._cond.wait()
            uid = self._ring.popleft()
            queue = self._queues[uid]
            job = queue.popleft()
            if queue:
                self._ring.append(uid)  # its next job waits for the others' turn
            else:
                del self._queues[uid]
            return uid, job

    def _work(self) -> None:
        while (taken := self._take()) is not None:
            uid, job = taken
            ok, result = False, None
            try:
                result, ok = job.work(), True
            except Exception:  # noqa: BLE001 - a job's failure must not end the thread
                log.exception("%s: a job failed", self.name)
            finally:
                with self._cond:
                    self._load[uid] -= 1
                    if not self._load[uid]:
                        del self._load[uid]
            if ok:
                try:
                    job.deliver(result)
                except Exception:  # noqa: BLE001
                    log.exception("%s: delivering a result failed", self.name)


class _Job:
    __slots__ = ("work", "deliver")

    def __init__(self, work: Callable[[], object], deliver: Callable[[object], None]):
        self.work = work
        self.deliver = deliver
