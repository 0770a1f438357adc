"""Tests for oomguard.host.kmsg: record framing and the follower."""

from __future__ import annotations

import errno
import os
import random
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from oomguard.forensics.oomreport import OomParser
from oomguard.host import kmsg
from oomguard.host.kmsg import KmsgFollower, KmsgRecord, parse_record

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kmsg"
PUBLISHED = FIXTURES / "published"
BOOT = 1_700_000_000.0

# ---------------------------------------------------------------- parse_record


def test_parse_record_plain() -> None:
    r = parse_record(b"6,344,1338008,-;EXT4-fs (vda): mounted filesystem r/w.\n")
    assert r == KmsgRecord(344, 1338008, 6, 0, "EXT4-fs (vda): mounted filesystem r/w.", False)


def test_parse_record_facility_and_dictionary_lines() -> None:
    r = parse_record(b"14,7,99,-;systemd[1]: hello\n SUBSYSTEM=usb\n DEVICE=c189:1\n")
    assert r is not None
    assert (r.facility, r.level, r.text) == (1, 6, "systemd[1]: hello")


def test_parse_record_unescapes_bytes_and_utf8() -> None:
    r = parse_record(b"4,1,2,-;a\\x5cb \\xe2\\x9c\\x93 tab\\x09end\\x0asecond line\n")
    assert r is not None
    assert r.text == "a\\b \u2713 tab\tend\nsecond line"


def test_parse_record_caller_field_and_continuation_flags() -> None:
    r = parse_record(b"6,5,7,c,caller=T123;part\n")
    assert r is not None and r.cont and r.text == "part"
    r2 = parse_record(b"6,6,8,+;more\n")
    assert r2 is not None and r2.cont
    r3 = parse_record(b"6,7,9,-;whole\n")
    assert r3 is not None and not r3.cont


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"hello",
        b"a,b,c,d;x",
        b"6,1;x",
        b"6,1,2;x",
        b"-1,2,3,-;x",
        b"6,-2,3,-;x",
        b";;;",
        b"\xff\xfe,1,2,-;x",
    ],
)
def test_parse_record_rejects_garbage(raw: bytes) -> None:
    assert parse_record(raw) is None


def test_parse_record_never_raises_on_random_bytes() -> None:
    rnd = random.Random(5)
    alphabet = b"0123456789,;-+c\\x\n abcdef"
    for _ in range(3000):
        raw = bytes(rnd.choice(alphabet) for _ in range(rnd.randrange(0, 40)))
        r = parse_record(raw)
        assert r is None or isinstance(r, KmsgRecord)



# ---------------------------------------------------------------- follower


class SeqpacketFollower(KmsgFollower):
    """A follower reading from a SOCK_SEQPACKET pair: one record per read,
    EAGAIN when empty, like /dev/kmsg. ``epipe_before`` makes the read that
    would return that seq raise EPIPE first, as an overrun does."""

    def __init__(self, sock: socket.socket, *args, epipe_before: set[int] = frozenset(), **kw):
        super().__init__("/nonexistent", *args, **kw)
        self.sock = sock
        self.epipe_before = set(epipe_before)

    def _open(self) -> int:
        return os.dup(self.sock.fileno())

    def _read(self, fd: int) -> bytes:
        data = os.read(fd, kmsg.RECORD_MAX)
        r = parse_record(data)
        if r is not None and r.seq in self.epipe_before:
            self.epipe_before.discard(r.seq)
            raise OSError(errno.EPIPE, "Broken pipe")
        return data


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.setblocking(False)
    return a, b


def _run(
    follower: KmsgFollower, writer: socket.socket, seqs: list[int]
) -> tuple[list[KmsgRecord], float]:
    got: list[KmsgRecord] = []
    follower.on_record = got.append
    stop = threading.Event()
    t = threading.Thread(target=follower.run, args=(stop,))
    t.start()
    for s in seqs:
        writer.send(f"6,{s},{s * 10},-;line {s}\n".encode())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and follower.last_seq != seqs[-1]:
        time.sleep(0.01)
    t0 = time.monotonic()
    stop.set()
    t.join(5)
    assert not t.is_alive()
    return got, time.monotonic() - t0


def test_follower_delivers_and_stops_promptly() -> None:
    w, r = _pair()
    f = SeqpacketFollower(r, current_boot_id="boot-a", poll_interval=0.2)
    got, stopped_in = _run(f, w, [1, 2, 3])
    assert [x.seq for x in got] == [1, 2, 3] and f.last_seq == 3 and f.lost == 0
    assert stopped_in < 1.0


def test_follower_outlives_a_failing_handler() -> None:
    w, r = _pair()
    f = SeqpacketFollower(r, current_boot_id="b")
    got: list[int] = []

    def handler(x: KmsgRecord) -> None:
        if x.seq == 2:
            raise RuntimeError("database is locked")
        got.append(x.seq)

    stop = threading.Event()
    f.on_record = handler
    t = threading.Thread(target=f.run, args=(stop,))
    t.start()
    for s in (1, 2, 3):
        w.send(f"6,{s},{s},-;line\n".encode())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and f.last_seq != 3:
        time.sleep(0.01)
    stop.set()
    t.join(5)
    assert got == [1, 3] and not t.is_alive()


def test_follower_skips_seen_records_on_the_same_boot_only() -> None:
    w, r = _pair()
    f = SeqpacketFollower(r, None, 3, "boot-a", current_boot_id="boot-a")
    got, _ = _run(f, w, [1, 2, 3, 4, 5])
    assert [x.seq for x in got] == [4, 5]

    w2, r2 = _pair()
    f2 = SeqpacketFollower(r2, None, 3, "boot-old", current_boot_id="boot-a")
    got2, _ = _run(f2, w2, [1, 2, 3, 4, 5])
    assert [x.seq for x in got2] == [1, 2, 3, 4, 5]


def test_follower_counts_records_that_rotated_out_while_down() -> None:
    w, r = _pair()
    lost: list[int] = []
    f = SeqpacketFollower(r, None, 3, "b", current_boot_id="b", on_lost=lost.append)
    got, _ = _run(f, w, [10, 11])
    assert [x.seq for x in got] == [10, 11]
    assert lost == [6] and f.lost == 6  # 4..9 never read


def test_follower_survives_epipe_and_reports_the_gap() -> None:
    w, r = _pair()
    lost: list[int] = []
    f = SeqpacketFollower(r, current_boot_id="b", on_lost=lost.append, epipe_before={7})
    # The writer overtook the reader: 4..6 are gone, the read hits EPIPE and
    # the next readable record is 8 (7 is consumed by the simulated error).
    got, _ = _run(f, w, [1, 2, 3, 7, 8, 9])
    assert [x.seq for x in got] == [1, 2, 3, 8, 9]
    assert lost == [4] and f.lost == 4


def test_follower_on_the_real_device() -> None:
    path = "/dev/kmsg"
    if not (os.access(path, os.R_OK) and os.access(path, os.W_OK)):
        pytest.skip("/dev/kmsg is not readable and writable here (needs root)")
    marker = f"oomguard-test {uuid.uuid4()}"
    seen: list[KmsgRecord] = []
    f = KmsgFollower(path, seen.append)
    stop = threading.Event()
    t = threading.Thread(target=f.run, args=(stop,))
    t.start()
    assert f.caught_up.wait(10)
    with open(path, "w") as dev:
        dev.write(f"<4>{marker}\n")  # userspace: the kernel files it under LOG_USER
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(marker in r.text for r in seen):
        time.sleep(0.02)
    stop.set()
    t.join(5)
    assert not t.is_alive()
    mine = [r for r in seen if marker in r.text]
    assert len(mine) == 1 and mine[0].facility != 0
    assert not OomParser().feed(mine[0])
    # A restart that resumes after it does not see it again.
    again: list[KmsgRecord] = []
    f2 = KmsgFollower(path, again.append, mine[0].seq, f.boot_id)
    stop2 = threading.Event()
    t2 = threading.Thread(target=f2.run, args=(stop2,))
    t2.start()
    assert f2.caught_up.wait(10)
    stop2.set()
    t2.join(5)
    assert not any(marker in r.text for r in again)
    assert all(r.seq > mine[0].seq for r in again)


def test_now_usec_is_on_the_kernel_record_clock() -> None:
    if not (os.access("/dev/kmsg", os.R_OK) and os.access("/dev/kmsg", os.W_OK)):
        pytest.skip("/dev/kmsg is not readable and writable here (needs root)")
    marker = f"oomguard-clock {uuid.uuid4()}"
    before = kmsg.now_usec()
    with open("/dev/kmsg", "w") as dev:
        dev.write(f"<6>{marker}\n")
    after = kmsg.now_usec()
    (mine,) = [r for r in kmsg.read_ring() if marker in r.text]
    assert before - 50_000 <= mine.ts_usec <= after + 50_000
