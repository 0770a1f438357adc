"""Kernel log records from /dev/kmsg: one read() is one record.

* ``parse_record`` turns one read() of /dev/kmsg into a ``KmsgRecord``.
* ``KmsgFollower`` reads the ring (the whole of it first, then new records)
  in a thread and survives ring overruns and restarts.

What the records mean (OOM reports) is forensics/oomreport.py's business.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from oomguard.host import procfs
from oomguard.host.wakeup import stop_fd

log = logging.getLogger(__name__)

DEVICE = "/dev/kmsg"  # the kernel log, one record per read
LOG_KERN = 0  # syslog facility of kernel messages; userspace cannot log as LOG_KERN
RECORD_MAX = 16384  # larger than the kernel's per-record maximum (8 KiB)


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class KmsgRecord:
    seq: int
    ts_usec: int  # microseconds since boot (the kernel's printk clock)
    level: int  # 0 (emerg) .. 7 (debug)
    facility: int  # 0 for the kernel itself
    text: str  # unescaped; may hold newlines (multi-line printk)
    cont: bool  # a fragment that continues or is continued (older kernels)


_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")


def _unescape(data: bytes) -> str:
    # The kernel writes every byte < 0x20, >= 0x7f and "\" as \xNN; UTF-8
    # therefore arrives escaped and decodes only after unescaping.
    return _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), data).decode("utf-8", "replace")


def parse_record(raw: bytes) -> KmsgRecord | None:
    """One /dev/kmsg record: ``prio,seq,ts,flags[,...];text\\n`` then optional
    `` KEY=value`` lines. None for anything that is not such a record."""
    try:
        header, sep, rest = raw.partition(b";")
        if not sep:
            return None
        fields = header.split(b",")
        if len(fields) < 4:
            return None
        prio, seq, ts = int(fields[0]), int(fields[1]), int(fields[2])
        if prio < 0 or seq < 0 or ts < 0:
            return None
        flags = fields[3]
        # The text ends at the first newline; continuation lines (dictionary
        # properties like SUBSYSTEM=) start with a space and are not text.
        text = rest.split(b"\n", 1)[0]
        return KmsgRecord(
            seq=seq,
            ts_usec=ts,
            level=prio & 7,
            facility=prio >> 3,
            text=_unescape(text),
            cont=b"c" in flags or b"+" in flags,
        )
    except (ValueError, IndexError):
        return None


# ---------------------------------------------------------------- events


def now_usec() -> int:
    """Now on the clock of the kernel's record timestamps (for ``expire``)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# ---------------------------------------------------------------- follower


LOST_LOG_EVERY = 10.0


class KmsgFollower:
    """Reads /dev/kmsg in a thread: the whole ring first, then new records.

    ``start_after_seq`` and ``boot_id`` are what the caller persisted last
    time (the sequence number of the last record it handled, and the boot it
    belongs to). Records up to that number are skipped if the machine has not
    rebooted since, so a restart neither loses nor repeats events. Sequence
    numbers restart at each boot; after a reboot nothing is skipped.

    Records lost to ring overruns (EPIPE on read) or that fell out of the
    ring while nobody was reading are counted in ``lost`` and reported to
    ``on_lost``. ``on_idle`` is called whenever the ring is drained (a good
    moment for ``OomParser.expire``); when it returns True it is called
    again within ``poll_interval``, otherwise, with a ``StopEvent`` as the
    stop (host/wakeup.py), the follower sleeps until a record comes. An exception from ``on_record`` is
    logged and the next record follows; ``run`` raises only if the device
    cannot be opened or read."""

    def __init__(
        self,
        path: str = DEVICE,
        on_record: Callable[[KmsgRecord], None] | None = None,
        start_after_seq: int | None = None,
        boot_id: str | None = None,
        *,
        current_boot_id: str | None = None,
        on_lost: Callable[[int], None] | None = None,
        on_idle: Callable[[], bool | None] | None = None,
        poll_interval: float = 0.25,
    ):
        self.path = path
        self.on_record = on_record or (lambda rec: None)
        if current_boot_id is None:
            try:
                current_boot_id = procfs.boot_id()
            except OSError:
                current_boot_id = None
        self.boot_id = current_boot_id  # the boot the records read belong to
        same_boot = boot_id is not None and boot_id == current_boot_id
        self.start_after_seq = start_after_seq if same_boot else None
        self.on_lost = on_lost
        self.on_idle = on_idle
        self.poll_interval = poll_interval
        self.last_seq: int | None = None  # of the last record handed to on_record
        self.lost = 0
        self._unlogged = 0
        self._next_lost_log = 0.0
        self.caught_up = threading.Event()  # set once the ring's backlog is read

    def _open(self) -> int:
        return os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)

    def _read(self, fd: int) -> bytes:
        return os.read(fd, RECORD_MAX)

    def _report_lost(self, count: int, why: str) -> None:
        if count <= 0:
            return
        self.lost += count
        self._unlogged += count
        # A livelock overruns the ring thousands of times a minute: one line
        # per LOST_LOG_EVERY seconds with the total, not one per overrun.
        now = time.monotonic()
        if now >= self._next_lost_log:
            log.warning(
                "kmsg: %d kernel log records lost (%s); OOM reports among them are missed",
                self._unlogged, why,
            )  # fmt: skip
            self._unlogged = 0
            self._next_lost_log = now + LOST_LOG_EVERY
        if self.on_lost is not None:
            self.on_lost(count)

    def run(self, stop: threading.Event) -> None:
        fd = self._open()
        try:
            self._loop(fd, stop)
        finally:
            os.close(fd)

    def _loop(self, fd: int, stop: threading.Event) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        wake = stop_fd(stop)
        if wake is not None:
            poller.register(wake, select.POLLIN)
        interval_ms = int(self.poll_interval * 1000)
        expected: int | None = None  # seq we should see next, once we know
        overrun = False
        while not stop.is_set():
            try:
                raw = self._read(fd)
            except BlockingIOError:
                self.caught_up.set()
                again = self.on_idle() if self.on_idle is not None else False
                # Nothing pending: sleep until a record (or the stop) comes.
                poller.poll(interval_ms if again or wake is None else None)
                continue
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.EPIPE:
                    # The writer overtook us; the next read starts at the
                    # oldest record still in the ring. Count the gap then.
                    overrun = True
                    continue
                raise
            if not raw:
                # The device never reads empty; do not spin if something else does.
                self.caught_up.set()
                if self.on_idle is not None:
                    self.on_idle()
                stop.wait(self.poll_interval)
                continue
            rec = parse_record(raw)
            if rec is None:
                log.debug("kmsg: unparsable record %r", raw[:200])
                continue
            if expected is None and self.start_after_seq is not None:
                expected = self.start_after_seq + 1
            if expected is not None and rec.seq > expected:
                self._report_lost(
                    rec.seq - expected,
                    "ring buffer overrun" if overrun else "rotated out of the ring",
                )
            overrun = False
            expected = rec.seq + 1
            if self.start_after_seq is not None and rec.seq <= self.start_after_seq:
                continue
            try:
                self.on_record(rec)
            except Exception:  # noqa: BLE001 - one bad record must not end the following
                log.exception("kmsg: handling record %d failed", rec.seq)
            self.last_seq = rec.seq


def read_ring(path: str = DEVICE) -> list[KmsgRecord]:
    """Every record now in the ring (for one-shot tools and the capture script)."""
    out: list[KmsgRecord] = []
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        while True:
            try:
                raw = os.read(fd, RECORD_MAX)
            except BlockingIOError:
                break
            except BrokenPipeError:
                continue
            if not raw:
                break
            if (rec := parse_record(raw)) is not None:
                out.append(rec)
    finally:
        os.close(fd)
    return out
