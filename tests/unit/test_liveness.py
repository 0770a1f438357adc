"""host.sdnotify and telemetry.liveness over a real notify socket: READY=1,
and watchdog keep-alives only while the healer ticks."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from oomguard.host.sdnotify import Notifier
from oomguard.telemetry.liveness import Liveness


@pytest.fixture
def notify_socket(tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    s.bind(path)
    s.settimeout(0)
    yield path, s
    s.close()


def received(s: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(s.recv(4096).decode())
        except BlockingIOError:
            return out


def env(path: str, usec: int | None = 6_000_000, pid: int | None = None) -> dict[str, str]:
    e = {"NOTIFY_SOCKET": path}
    if usec is not None:
        e["WATCHDOG_USEC"] = str(usec)
        e["WATCHDOG_PID"] = str(os.getpid() if pid is None else pid)
    return e


def test_ready_names_the_main_pid_and_a_status(notify_socket):
    path, s = notify_socket
    assert Notifier(env(path)).ready("serving /run/oomguard/protect.sock")
    assert received(s) == [f"READY=1\nSTATUS=serving /run/oomguard/protect.sock\nMAINPID={os.getpid()}"]


def test_outside_systemd_nothing_is_sent_and_nothing_fails():
    n = Notifier({})
    assert not n.enabled and n.watchdog_seconds is None
    assert not n.ready("x") and not n.watchdog()
    assert Notifier({"NOTIFY_SOCKET": "relative/path"}).address is None


def test_an_abstract_socket_is_reached(notify_socket):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"oomguard-test-{os.getpid()}"
    s.bind("\0" + name)
    s.settimeout(5)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).stopping()
        assert s.recv(100) == b"STOPPING=1"
    finally:
        s.close()


def test_a_watchdog_meant_for_another_process_is_ignored(notify_socket):
    path, _ = notify_socket
    assert Notifier(env(path, pid=1)).watchdog_seconds is None
    assert Notifier(env(path, usec=0)).watchdog_seconds is None
    assert Notifier(env(path, usec=2_500_000)).watchdog_seconds == 2.5


def test_keepalives_go_out_only_while_the_healer_ticks(notify_socket):
    path, s = notify_socket
    now = [1000.0]
    live = Liveness(Notifier(env(path)), clock=lambda: now[0])
    assert live.beat()  # just started
    now[0] += 5
    live.tick()
    now[0] += 5.9
    assert live.beat()  # the last tick is 5.9 s old: within the 6 s period
    now[0] += 0.2
    assert not live.beat() and not live.beat()  # frozen: systemd will restart us
    live.tick()
    assert live.beat()  # ticking again
    assert received(s) == ["WATCHDOG=1"] * 3


def test_without_a_healer_being_scheduled_is_enough(notify_socket):
    path, s = notify_socket
    now = [0.0]
    live = Liveness(Notifier(env(path)), watch_ticks=False, clock=lambda: now[0])
    now[0] += 3600
    assert live.beat() and received(s) == ["WATCHDOG=1"]


def test_the_thread_beats_a_third_of_the_period_and_stops(notify_socket):
    path, s = notify_socket
    s.settimeout(10)
    live = Liveness(Notifier(env(path, usec=300_000)), watch_ticks=False)
    stop = threading.Event()
    t = threading.Thread(target=live.run, args=(stop,))
    t.start()
    try:
        assert [s.recv(100) for _ in range(3)] == [b"WATCHDOG=1"] * 3
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()


def test_the_healers_tick_reaches_both_the_exporter_and_the_watchdog(notify_socket):
    from oomguard.telemetry.hooks import NO_HOOKS
    from oomguard.telemetry.liveness import TickWatch

    path, _ = notify_socket
    now = [0.0]
    live = Liveness(Notifier(env(path)), clock=lambda: now[0])
    seen = []

    class Exporter(type(NO_HOOKS)):
        def set_tick_seconds(self, seconds: float) -> None:
            seen.append(("tick", seconds))

        def set_downtime(self, seconds: float) -> None:
            seen.append(("downtime", seconds))

    hooks = TickWatch(Exporter(), live)
    now[0] = 100.0
    assert not live.alive()
    hooks.set_tick_seconds(0.25)
    hooks.set_downtime(42.0)
    assert live.alive() and seen == [("tick", 0.25), ("downtime", 42.0)]
