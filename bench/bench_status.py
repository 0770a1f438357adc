"""`oomguard status` and `oomguard top` as a user runs them, with a real daemon
and N sleeping processes, beside `ps -eo pid,oom,oomadj,rss,comm`.

Each command is a fresh process (the venv's console script), timed from
spawn to exit; the three are interleaved round by round so the machine's
drift hits them alike. Medians and ratios to ps. The daemon runs with its
policy on process events, the broker's socket and the event store, as on a
server; the sleepers are killed at the end, whatever happens.

    python3 bench/bench_status.py [--procs 0,10000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
PS = ["ps", "-eo", "pid,oom,oomadj,rss,comm"]


def sleepers(n: int) -> subprocess.Popen | None:
    if not n:
        return None
    script = f"i=0; while [ $i -lt {n} ]; do sleep 3600 & i=$((i+1)); done; echo ready; wait"
    shell = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, start_new_session=True)
    assert shell.stdout is not None
    shell.stdout.readline()
    return shell


def stop_group(shell: subprocess.Popen | None) -> None:
    if shell is None:
        return
    try:
        os.killpg(shell.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    shell.wait()


def timed(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=120)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", default="0,10000")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="oomguard-bench-status-") as d:
        base = Path(d)
        cfg = base / "oomguard.toml"
        cfg.write_text(f"""
[daemon]
state_dir = "{base / 'state'}"
[protect]
socket = "{base / 'protect.sock'}"
[events]
db = "{base / 'state' / 'events.db'}"
[metrics]
listen = ""
""")
        daemon = subprocess.Popen([str(BIN / "oomguard"), "--config", str(cfg), "daemon"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        og = [str(BIN / "oomguard"), "--config", str(cfg)]
        try:
            deadline = time.monotonic() + 60
            while subprocess.run([*og, "runs"], capture_output=True).returncode != 0:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the daemon did not start")
                time.sleep(0.2)
            print(f"{'processes':>9}  {'command':<32} {'median ms':>10} {'vs ps':>7}")
            for n in [int(x) for x in args.procs.split(",") if x.strip()]:
                crowd = sleepers(n)
                try:
                    time.sleep(2)  # the policy's looks at the new processes settle
                    cmds = {"ps -eo pid,oom,oomadj,rss,comm": PS, "oomguard status": [*og, "status"],
                            "oomguard top": [*og, "top"]}  # fmt: skip
                    for argv in cmds.values():
                        timed(argv)  # warm the dentry caches
                    times: dict[str, list[float]] = {k: [] for k in cmds}
                    for _ in range(args.rounds):
                        for name, argv in cmds.items():
                            times[name].append(timed(argv))
                    ps = statistics.median(times["ps -eo pid,oom,oomadj,rss,comm"])
                    total = len([p for p in os.listdir("/proc") if p.isdigit()])
                    for name, ts in times.items():
                        med = statistics.median(ts)
                        print(f"{total:>9}  {name:<32} {med * 1000:10.1f} {med / ps:6.2f}x")
                finally:
                    stop_group(crowd)
        finally:
            daemon.terminate()
            daemon.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
