"""The event reader: a process of its own that answers ``events`` pages, so
the JSON work of big pages never holds the daemon's GIL while a grant waits.

The daemon's query pool hands it one checked ``PageQuery`` line at a time
(the pool's fairness and per-user caps still apply: the asking thread waits,
without the GIL, for the reply) and gets back the complete reply line, which
the broker sends as it is. The reader opens the store read-only, runs at a
lower priority and at oom_score_adj 0 (it is not the daemon), starts on the
first query and exits after ``IDLE`` seconds without one, so an idle daemon
costs nothing more. If it cannot start, dies or hangs, the daemon answers
in-process, as before the reader existed.

    python3 -I -m oomguard.forensics.eventreader DB [IDLE]
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
import time

from oomguard.forensics.eventpage import PageQuery, events_page, reply_line

log = logging.getLogger(__name__)

IDLE = 60.0  # seconds without a query before the reader exits
TIMEOUT = 10.0  # seconds one page may take before the reader is replaced
RETRY_AFTER = 60.0  # seconds in-process after a fresh reader failed
NICE = 10


class ReaderGone(Exception):
    """The reader died, hung or could not start."""


class EventReader:
    """The daemon's side: one reader process, asked by one thread at a time."""

    def __init__(self, db: str, *, idle: float = IDLE, timeout: float = TIMEOUT):
        self.db = db
        self.idle = idle
        self.timeout = timeout
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._broken_until = 0.0
        self.started = 0  # readers started so far (tests and logs)

    @property
    def usable(self) -> bool:
        return self.db != ":memory:" and time.monotonic() >= self._broken_until

    def ask(self, q: PageQuery) -> bytes | None:
        """The reply line for ``q``, or None: then answer in-process."""
        if not self.usable:
            return None
        with self._lock:
            for _ in range(2):  # a reader that exited idle just now: start another once
                fresh = self._proc is None or self._proc.poll() is not None
                try:
                    if fresh:
                        self._spawn()
                    return self._exchange(q.to_line())
                except ReaderGone as e:
                    self._reap()
                    if fresh:
                        log.warning("event reader failed (%s); answering in the daemon for %gs", e, RETRY_AFTER)
                        self._broken_until = time.monotonic() + RETRY_AFTER
                        return None
            return None

    def close(self) -> None:
        with self._lock:
            self._reap()

    def _spawn(self) -> None:
        argv = [sys.executable, "-I", "-m", __name__, self.db, f"{self.idle:g}"]
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        except OSError as e:
            raise ReaderGone(f"cannot start {argv[0]}: {e}") from e
        self.started += 1

    def _exchange(self, line: bytes) -> bytes:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            os.write(proc.stdin.fileno(), line)
        except OSError as e:  # EPIPE: it exited
            raise ReaderGone(str(e)) from e
        fd, chunks = proc.stdout.fileno(), []
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise ReaderGone(f"no reply within {self.timeout:g}s")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise ReaderGone(f"it exited ({proc.poll()})")
            chunks.append(chunk)
            if chunk.endswith(b"\n"):
                return b"".join(chunks)

    def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()  # EOF: an idle reader exits at once
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve(db: str, idle: float) -> int:
    """The reader process: one query line in, one reply line out."""
    from oomguard.forensics.events import EventStore
    from oomguard.host import procfs

    os.nice(NICE)  # grants first
    procfs.write_oom_score_adj(0)  # the daemon's -1000 is not ours to keep
    store = EventStore(db, 0, 0, readonly=True)
    inp = sys.stdin.buffer
    while select.select([inp], [], [], idle)[0]:  # one request at a time: nothing is left buffered
        line = inp.readline()
        if not line:
            break
        try:
            reply = reply_line(events_page(store, PageQuery.from_line(line)))
        except Exception as e:  # noqa: BLE001 - the daemon gets an answer, the reader lives on
            log.exception("event reader: a page failed")
            reply = (json.dumps({"ok": False, "error": f"internal error: {e.__class__.__name__}"}) + "\n").encode()
        try:
            _write_all(1, reply)
        except BrokenPipeError:  # the daemon is gone
            break
    store.close()
    return 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="oomguard event reader: %(message)s")
    sys.exit(serve(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else IDLE))
