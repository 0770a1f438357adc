"""Grant latency while other users hammer the broker with queries.

Issue 8 measured the old single-threaded loop: one user's `events` query
(24 MB, 2.4 s) held another user's ping for 1.95 s, and `status` (a /proc
scan plus the healer's lock) ran on the loop too. Now queries run in a fair
pool and events come in pages. This times a grant, from connect to the
reply line, p50 and p99, idle and while 4 users (uids 2001-2004, each its
own process) ask for `status` and `events` back to back, and prints the ratio
loaded/idle (goal: p99 within 1.5x).

    python3 bench/bench_broker.py [--rounds N]    # as root

What runs is the daemon's own broker and ops (oomguard.daemon.Daemon, in a
server process of its own), with an event store of 20,000 events naming the
hammering users. Each grant comes from a fresh forked process, so each is a
new run: allow-list, pin, identity, the mm-sharing scan (kcmp against every
process), admission, the registry's durable write. One thing differs from
production: the -1000 write needs CAP_SYS_RESOURCE, which root on this
host lacks, so, as in tests/unit/test_lifecycle.py, procfs.write_oom_score_adj
is replaced by a no-op in the server process (the write is one syscall). Run
cgroups are off (this host has cgroup v1). The guest has neither limit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

HAMMERS = (2001, 2002, 2003, 2004)
HAMMER = (
    "import json, socket, sys\n"
    "path, n = sys.argv[1], 0\n"
    "while True:\n"
    "    op = sys.argv[2:][n % len(sys.argv[2:])]; n += 1\n"
    "    s = socket.socket(socket.AF_UNIX); s.connect(path)\n"
    "    s.sendall((json.dumps({'op': op, 'limit': 100000, 'page': 500}) + '\\n').encode())\n"
    "    while s.recv(1 << 16): pass\n"
    "    s.close()\n"
)


def serve(base: Path) -> None:
    """The server process: the daemon's broker, its ops and a reaper."""
    from oomguard import config
    from oomguard.daemon import Daemon
    from oomguard.host import procfs

    procfs.write_oom_score_adj = lambda value, pid="self", dir_fd=None: None  # no CAP_SYS_RESOURCE here
    cfg = config.Config(
        state_dir=str(base / "state"),
        protect=config.ProtectConfig(socket=str(base / "protect.sock"), allow_uids=frozenset({0}),
                                     run_cgroups=False, max_runs_per_uid=4096),
    )  # fmt: skip
    cfg = replace(cfg, events=replace(cfg.events, db=str(base / "state" / "events.db")),
                  policy=replace(cfg.policy, enforce=False))  # fmt: skip
    d = Daemon(cfg)
    now = time.time()
    for n in range(20_000):
        d.store.add("policy", {"n": n, "comm": "php-fpm", "cgroup": "/oomguard.app/x" * 4},
                    ts=now - 20_000 + n, uids=[HAMMERS[n % 4]])  # fmt: skip
    stop = threading.Event()

    def reaper() -> None:
        while not stop.wait(0.5):
            d.lifecycle.reap()
            d.registry.flush()

    threading.Thread(target=reaper, daemon=True).start()
    print("ready", flush=True)
    d.broker.serve(stop)


def grant_once(path: str) -> float:
    """Fork a fresh peer that asks once; the seconds from connect to reply."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            t0 = time.perf_counter()
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.sendall(b'{"op": "protect", "v": 1}\n')
            reply = s.makefile("rb").readline()
            took = time.perf_counter() - t0
            ok = json.loads(reply).get("ok") is True
            os.write(w, struct.pack("d?", took, ok))
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    took, ok = struct.unpack("d?", data)
    if not ok:
        raise SystemExit("a grant was refused; the bench measures grants only")
    return took


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def hammered(path: str, rounds: int, ops: list[str]) -> list[float]:
    hammers = [subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                                 sys.executable, "-c", HAMMER, path, *ops]) for uid in HAMMERS]  # fmt: skip
    try:
        time.sleep(1.0)  # let them reach their stride
        return measure(path, rounds)
    finally:
        for p in hammers:
            p.kill()
            p.wait()


def measure(path: str, rounds: int) -> list[float]:
    for _ in range(5):
        grant_once(path)  # warm
    return [grant_once(path) for _ in range(rounds)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(Path(args.serve))
        return 0
    if os.geteuid() != 0:
        raise SystemExit("run as root: the hammering users are other uids")
    base = Path(tempfile.mkdtemp(prefix="oomguard-bench-broker-", dir="/tmp"))
    base.chmod(0o755)
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(base)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        path = str(base / "protect.sock")
        rows = {
            "idle": measure(path, args.rounds),
            # the reference: the same client load, all of it answered on the loop
            "4 users on ping": hammered(path, args.rounds, ["ping"]),
            "4 users on status+events": hammered(path, args.rounds, ["status", "events"]),
        }
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(base, ignore_errors=True)
    print(f"grant latency, {args.rounds} grants each (ms)")
    print(f"{'':28}{'p50':>10}{'p99':>10}")
    for name, values in rows.items():
        print(f"{name:28}{statistics.median(values) * 1e3:10.2f}{percentile(values, 0.99) * 1e3:10.2f}")
    idle, loaded = rows["idle"], rows["4 users on status+events"]
    p50 = statistics.median(loaded) / statistics.median(idle)
    p99 = percentile(loaded, 0.99) / percentile(idle, 0.99)
    print(f"{'ratio status+events/idle':28}{p50:10.2f}{p99:10.2f}   (goal: p99 within 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
