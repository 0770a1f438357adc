#!/usr/bin/env python3
"""Time `oomguard top`'s ranking against `ps -eo pid,oom,oomadj,rss,comm`.

Spawns N sleeping processes (default 10,000) so the box looks like a busy
shop, then alternates the two, several rounds each, and prints medians and
the ratio. The sleepers are killed at the end, whatever happens.

    python3 bench/bench_top.py [--procs 10000] [--rounds 7] [--as-user nobody]

--as-user runs the sleepers as that user (needs root): processes owned by
root cost oomguard one more read (status, to see through non-dumpable
processes), so the two cases are worth comparing.
"""

from __future__ import annotations

import argparse
import os
import pwd
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from oomguard.cli.render import format_ranking  # noqa: E402
from oomguard.forensics import ranking  # noqa: E402
from oomguard.host import procfs  # noqa: E402

PS = ["ps", "-eo", "pid,oom,oomadj,rss,comm"]


def spawn(n: int, user: str | None) -> subprocess.Popen:
    """One shell that starts n sleepers in its own process group."""
    preexec = None
    if user:
        pw = pwd.getpwnam(user)

        def preexec() -> None:
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)

    script = f"i=0; while [ $i -lt {n} ]; do sleep 3600 & i=$((i+1)); done; echo ready; wait"
    shell = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, start_new_session=True,
                             preexec_fn=preexec)
    assert shell.stdout is not None
    shell.stdout.readline()
    return shell


def kill(shell: subprocess.Popen) -> None:
    """SIGKILL the whole group and wait until none of it is left (the
    orphaned sleepers are reaped by init, which takes a moment)."""
    try:
        os.killpg(shell.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    shell.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.killpg(shell.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def time_it(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--as-user", default=None)
    args = ap.parse_args()

    shell = spawn(args.procs, args.as_user) if args.procs else None
    try:
        total = len(procfs.list_pids())
        ps_run = lambda: subprocess.run(PS, stdout=subprocess.PIPE, check=True)  # noqa: E731
        rank_only = ranking.rank
        rank_table = lambda: format_ranking(ranking.rank())  # noqa: E731
        ps_run(), rank_table()  # warm the dentry caches for both
        ps_t, rank_t, table_t = [], [], []
        for _ in range(args.rounds):  # interleaved, so drift hits both alike
            ps_t += time_it(ps_run, 1)
            rank_t += time_it(rank_only, 1)
            table_t += time_it(rank_table, 1)
        rows = len(ranking.rank().entries)
        med = statistics.median
        print(f"processes on the host: {total} (spawned {args.procs}"
              f"{' as ' + args.as_user if args.as_user else ' as ' + pwd.getpwuid(os.getuid()).pw_name})")
        print(f"oomguard ranking rows: {rows} (kernel threads left out)")
        print(f"{'ps -eo pid,oom,oomadj,rss,comm':<40} median {med(ps_t) * 1000:8.1f} ms  "
              f"(min {min(ps_t) * 1000:.1f})")
        print(f"{'ranking.rank()':<40} median {med(rank_t) * 1000:8.1f} ms  (min {min(rank_t) * 1000:.1f})")
        print(f"{'ranking.rank() + format_ranking()':<40} median {med(table_t) * 1000:8.1f} ms  "
              f"(min {min(table_t) * 1000:.1f})")
        print(f"ratio (rank + table) / ps: {med(table_t) / med(ps_t):.2f}x; rank alone / ps: "
              f"{med(rank_t) / med(ps_t):.2f}x")
    finally:
        if shell is not None:
            kill(shell)
    return 0


if __name__ == "__main__":
    sys.exit(main())
