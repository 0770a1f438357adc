"""host/procevents.py: resyncs after lost events, and the real connector."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import pytest

from oomguard.host import procevents
from oomguard.host.procevents import LossTracker


def test_a_loss_resyncs_at_once_and_again_once_the_queue_is_drained() -> None:
    t = LossTracker()
    assert not t.drained(0.0) and not t.mid_storm(0.0)  # nothing lost: nothing to do
    assert t.overrun(10.0)  # first loss: resync now
    assert not t.overrun(10.1)  # the same episode
    assert not t.mid_storm(10.5)
    assert t.drained(10.6)  # the backlog is gone: the resync that sees everything
    assert not t.drained(10.7) and not t.mid_storm(20.0)  # and only once


def test_a_storm_that_keeps_the_queue_full_resyncs_every_second() -> None:
    t = LossTracker()
    t.overrun(0.0)
    assert [t.mid_storm(x / 10) for x in range(1, 25)].count(True) == 2  # at 1.0 and 2.0
    t.overrun(2.2)  # still the same episode
    assert t.drained(2.5)


@pytest.mark.skipif(not procevents.available(), reason="needs root and the process-event connector")
def test_an_overrun_of_the_real_connector_is_followed_by_a_drained_resync() -> None:
    pe = procevents.ProcEvents(rcvbuf=4096)
    pe.open()
    assert pe.sock is not None
    pe.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
    for _ in range(5):  # far more events than the buffer holds, none read yet
        subprocess.run(["/bin/sh", "-c", "for i in $(seq 60); do /bin/true; done"], check=True)
    seen: list[tuple] = []
    stop = threading.Event()
    thread = threading.Thread(target=pe.run, args=(seen.append, stop), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while seen.count(("lost",)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    thread.join(10)
    assert seen.count(("lost",)) >= 2, seen[:5]  # at the loss, and after the drain


@pytest.mark.skipif(not procevents.available(), reason="needs root and the process-event connector")
def test_a_burst_is_read_with_few_wakeups_and_nothing_is_lost(monkeypatch) -> None:
    pe = procevents.ProcEvents()
    pe.open()
    selects = []
    real = procevents.select.select
    monkeypatch.setattr(procevents.select, "select", lambda *a: selects.append(1) or real(*a))
    kids = [subprocess.Popen(["/bin/true"]) for _ in range(40)]  # queued before anyone reads
    for k in kids:
        k.wait()
    seen: list[tuple] = []
    stop = threading.Event()
    thread = threading.Thread(target=pe.run, args=(seen.append, stop), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    exited = {k.pid for k in kids}
    while not exited <= {ev[1] for ev in seen if ev[0] == "exit"} and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    thread.join(10)
    assert exited <= {ev[1] for ev in seen if ev[0] == "exit"}  # every exit, in one stream
    assert ("lost",) not in seen
    assert len(selects) < len(kids)  # 120 or more datagrams, far fewer waits
