"""What the run registry costs a grant and a fork, with few or many runs recorded.

Issue 13 measured another user's grant at 0.07 s with an empty registry and
0.58 s with 1,000 runs in it: every lookup scanned every run ever recorded,
and every change rewrote and fsynced runs.json under the registry's lock.
This times, on the host, the registry's share of a grant (admission, the
run's begin with its durable write) and of a fork (member tracking, with the
daemon's deferred writes), with an empty registry and with 1,000 ended plus
60 active runs (the registry keeps at most 500 ended ones after a reap, so
1,000 is more than the daemon ever holds):

    python3 bench/bench_registry.py [--rounds N]

Prints the median and p99 per operation and the ratio full/empty.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from oomguard.runs.lifecycle import RunLifecycle
from oomguard.runs.registry import RunRegistry
from oomguard.runs.run import Run


def seeded(path: Path, ended: int, active: int) -> RunRegistry:
    reg = RunRegistry(path, "bench", keep_ended=10**6)
    now = time.time()
    for i in range(ended + active):
        done = i < ended
        reg.add(Run(reg.new_id(), 1000 + i % 50, "u", 10_000 + i, i + 1, now, "x", None,
                    ended=now if done else None, end_reason="exited" if done else None))
    return reg


def timed(fn, rounds: int) -> list[float]:
    out = []
    for i in range(rounds):
        start = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - start)
    return out


def measure(reg: RunRegistry, rounds: int) -> dict[str, list[float]]:
    life = RunLifecycle(reg)
    base = reg.all()[-1].id + 1

    def grant(i: int) -> None:
        life.admit(7000, 50_000 + i, i, "/user.slice/x", 10**6)
        run = Run(reg.new_id(), 7000, "u", 50_000 + i, i, time.time(), "x", None)
        with reg.lock:
            life.begin(run)
        reg.flush()  # the broker's durable write before its reply

    reg.deferred = False
    grants = timed(grant, rounds)
    reg.deferred = True  # as in the daemon: the reaper writes forks in batches
    parent = reg.get(base)
    forks = timed(lambda i: life.member(parent.pid, parent.starttime, 90_000 + i, i), rounds * 10)
    flush = timed(lambda i: reg.flush(), 1)
    return {"grant": grants, "fork": forks, "flush after the forks": flush}


def fmt(values: list[float]) -> str:
    p99 = sorted(values)[max(0, int(len(values) * 0.99) - 1)]
    return f"median {statistics.median(values) * 1e3:8.3f} ms  p99 {p99 * 1e3:8.3f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        empty = measure(seeded(Path(d) / "empty.json", 0, 1), args.rounds)
        full = measure(seeded(Path(d) / "full.json", 1000, 60), args.rounds)
    for op in empty:
        e, f = empty[op], full[op]
        ratio = statistics.median(f) / statistics.median(e)
        print(f"{op:22s} empty: {fmt(e)} | 1000+60 runs: {fmt(f)} | ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
