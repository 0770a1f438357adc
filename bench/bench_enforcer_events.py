#!/usr/bin/env python3
"""What one process event costs the policy enforcer, at 100 and at 10,000
known processes: flat in the process count is the goal.

Events for pids no process has (so nothing is read from /proc and only the
enforcer's own books count): an exit, and an exec of a process already gone,
each among N remembered processes. The ratio of the two columns is what
matters; run it again with --src=DIR (an exported old commit, e.g.
``git archive c485a51 src | tar -x -C /tmp/ref``) for a before/after.

    python3 bench/bench_enforcer_events.py [--src=/tmp/ref/src] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

_SRC = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--src=")), None)
sys.path.insert(0, _SRC or str(Path(__file__).resolve().parents[1] / "src"))

from oomguard.config import parse_policy_class  # noqa: E402
from oomguard.policy.enforcer import Enforcer  # noqa: E402

CLS = parse_policy_class({"name": "bench", "oom_score_adj": 500, "comm": ["oomgbench-*"]}, "bench")
BASE = 7_000_000  # above any real pid
EVENTS = 100


def per_event(known: int, kind: str, rounds: int) -> float:
    """Median microseconds per event over ``rounds``, among ``known`` processes."""
    enf = Enforcer((CLS,), None, self_pid=0)
    book = getattr(enf, "adj", None)  # the values looks saw (none in older trees)
    out = []
    for _ in range(rounds):
        for i in range(known):
            enf._classes[(BASE + i, 1)] = CLS  # what events and resyncs learn
            if book is not None:
                book.note((BASE + i, 1), -1000 if i % 10 == 0 else 500)
        step = max(1, known // EVENTS)
        pids = [BASE + i for i in range(0, known, step)][:EVENTS]
        t = time.perf_counter()
        for pid in pids:
            if kind == "exit":
                enf.on_exit(pid)
            else:
                enf.on_exec(pid)  # gone by now: forgotten, nothing read but the failed open
        out.append((time.perf_counter() - t) / len(pids) * 1e6)
    return statistics.median(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=None, help="the code tree (read before import, as --src=DIR)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(f"code: {_SRC or 'this tree'}")
    print(f"{'event':<8} {'100 known':>12} {'10,000 known':>14} {'ratio':>7}")
    for kind in ("exit", "exec"):
        small, big = per_event(100, kind, args.rounds), per_event(10_000, kind, args.rounds)
        print(f"{kind:<8} {small:9.2f} us {big:11.2f} us {big / small:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
