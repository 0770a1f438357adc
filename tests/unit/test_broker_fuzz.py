"""The broker's protocol under hostile input, with a fixed seed.

Each request is one of: random bytes, JSON of random shape, or a known op
with each of its fields replaced by a hostile value (huge and negative
integers, floats at the edge, NaN spelled in JSON, deep nesting, long
strings, wrong types). The broker serves the daemon's real ops. It must
answer every one with a clear reply (never "internal error"), log no
traceback, leak no fd, and still answer ping. CI runs a few hundred;
``OOMGUARD_FUZZ_REQUESTS=20000`` (or scripts/broker-fuzz) runs longer.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import random
import socket
import time

import pytest
from broker_rig import Rig, ask, connect, in_process_daemon

SEED = 20261202
REQUESTS = int(os.environ.get("OOMGUARD_FUZZ_REQUESTS", "400"))
OPS = ["protect", "ping", "runs", "kill-run", "events", "status", "", "x" * 5000, "events\x00"]
FIELDS = ["v", "all", "id", "since", "kinds", "limit", "page", "before", "op"]


def hostile_value(rnd: random.Random, depth: int = 0):
    pick = rnd.randrange(14)
    if pick == 0:
        return rnd.choice([10**4000, -(10**4000), 2**63, 2**64, -1, 0, 2**53 + 1])
    if pick == 1:
        return rnd.choice([1e308, -1e308, 5e-324, -0.0, 0.5, 1e20])
    if pick == 2:
        return "x" * rnd.choice([0, 1, 64, 65, 3000])
    if pick == 3:
        return rnd.choice([True, False, None])
    if pick == 4 and depth < 3:
        return [hostile_value(rnd, depth + 1) for _ in range(rnd.randrange(4))]
    if pick == 5 and depth < 3:
        return {rnd.choice(FIELDS): hostile_value(rnd, depth + 1)}
    if pick == 6:
        return [rnd.uniform(-1e12, 1e12), rnd.randrange(-(2**70), 2**70)]  # cursor-shaped
    if pick == 7:
        return ["grant"] * rnd.randrange(0, 100)
    if pick == 8:
        return "\udcff\x1b[2J"  # an unpaired surrogate and a terminal escape
    return rnd.randrange(-(2**40), 2**40)


def hostile_request(rnd: random.Random) -> bytes:
    kind = rnd.randrange(10)
    if kind == 0:
        return bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 300))) + b"\n"
    if kind == 1:
        return b"[" * rnd.randrange(1, 3000) + b"\n"
    if kind == 2:
        op = rnd.choice(OPS[:6]).encode()
        return b'{"op": "' + op + b'", "' + rnd.choice(FIELDS).encode() + b'": ' + rnd.choice(
            [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"9" * 4000, b"-" + b"9" * 4400]) + b"}\n"
    request = {"op": rnd.choice(OPS)}
    for field in rnd.sample(FIELDS[:-1], rnd.randrange(0, 4)):
        request[field] = hostile_value(rnd)
    if rnd.randrange(20) == 0:
        request["op"] = hostile_value(rnd)
    return (json.dumps(request) + "\n").encode(errors="surrogatepass")


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def daemon():
    rig = Rig()
    d = in_process_daemon(rig)
    yield d
    rig.close()
    d.event_reader.close()
    d.store.close()


def send(path: str, data: bytes) -> dict:
    with connect(path) as s:
        s.sendall(data)
        try:
            s.shutdown(socket.SHUT_WR)  # a request without a newline is answered too
        except OSError:
            pass
        line = s.makefile("rb").readline()
    return json.loads(line)


def test_hostile_requests_get_clear_refusals_and_the_broker_serves_on(daemon, caplog) -> None:
    path = daemon.cfg.protect.socket
    rnd = random.Random(SEED)
    assert ask(path, {"op": "status"})["ok"]  # warm: the pool's threads, sqlite's files
    assert ask(path, {"op": "events"})["ok"]  # and the event reader's two pipes
    gc.collect()  # what earlier tests left for the collector closes now, not mid-run
    before = fds()
    caplog.set_level(logging.WARNING)
    answered = refused = 0
    for _ in range(REQUESTS):
        reply = send(path, hostile_request(rnd))
        answered += 1
        if not reply["ok"]:
            refused += 1
            assert isinstance(reply["error"], str) and "internal error" not in reply["error"], reply
    assert answered == REQUESTS and refused > REQUESTS // 2
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert ask(path, {"op": "ping"}) == {"ok": True, "uid": 0}
    # the broker closes a connection (socket, pidfd, /proc fd) just after its reply
    deadline = time.monotonic() + 30
    while fds() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fds() <= before
