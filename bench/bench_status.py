"""`oomguard status` and `oomguard top` as a user runs them, with a real daemon
and N sleeping processes, beside `ps -eo pid,oom,oomadj,rss,comm`.

Each command is a fresh process (the venv's console script), timed from
spawn to exit; they are interleaved round by round so the machine's drift
hits them alike. Medians and ratios to ps. The daemon runs with its policy
on process events, the broker's socket and the event store, as on a
server; the sleepers are killed at the end, whatever happens.

The commands are typed as on a set-up host, as bench_cli does: with the
shipped config (contrib/config/oomguard.toml, every key commented out) and
the daemon at the default socket, /run/oomguard/protect.sock, when that path
is free (root), otherwise found through $OOMGUARD_SOCKET; so `status` takes
the client's fast path (cli/fast). ``oomguard --config CFG status`` is the
argparse path that a config naming its socket takes, for comparison.

    python3 bench/bench_status.py [--procs 0,10000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
PS = ["ps", "-eo", "pid,oom,oomadj,rss,comm"]
DEFAULT_SOCKET = Path("/run/oomguard/protect.sock")
STATUS_TTL = 1.1  # socketops' Brief keeps a status answer for 1 s
SHIPPED = Path(__file__).resolve().parent.parent / "contrib" / "config" / "oomguard.toml"


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


def timed(argv: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=120, env=env)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", default="0,10000")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    made_dir = False
    with tempfile.TemporaryDirectory(prefix="oomguard-bench-status-") as d:
        base = Path(d)
        sock = base / "protect.sock"
        if os.geteuid() == 0 and not DEFAULT_SOCKET.exists():
            made_dir = not DEFAULT_SOCKET.parent.exists()
            DEFAULT_SOCKET.parent.mkdir(parents=True, exist_ok=True)
            sock = DEFAULT_SOCKET
        cfg = base / "oomguard.toml"
        cfg.write_text(f"""
[daemon]
state_dir = "{base / 'state'}"
[protect]
socket = "{sock}"
[events]
db = "{base / 'state' / 'events.db'}"
[metrics]
listen = ""
""")
        daemon = subprocess.Popen([str(BIN / "oomguard"), "--config", str(cfg), "daemon"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        og = [str(BIN / "oomguard"), "--config", str(cfg)]
        user = [str(BIN / "oomguard"), "--config", str(SHIPPED)]
        env = {k: v for k, v in os.environ.items() if k != "OOMGUARD_SOCKET"}
        if sock != DEFAULT_SOCKET:
            env["OOMGUARD_SOCKET"] = str(sock)
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
                    cmds = {"ps -eo pid,oom,oomadj,rss,comm": PS, "oomguard status": [*user, "status"],
                            "oomguard --config CFG status": [*og, "status"],
                            "oomguard top": [*user, "top"]}  # fmt: skip
                    for argv in cmds.values():
                        timed(argv, env)  # warm the dentry caches
                    times: dict[str, list[float]] = {k: [] for k in cmds}
                    for _ in range(args.rounds):
                        for name, argv in cmds.items():
                            if "status" in argv:
                                time.sleep(STATUS_TTL)  # past the daemon's shared answer: each computes afresh
                            times[name].append(timed(argv, env))
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
            if made_dir:  # ours alone: it did not exist before
                shutil.rmtree(DEFAULT_SOCKET.parent, ignore_errors=True)
            elif sock == DEFAULT_SOCKET:
                DEFAULT_SOCKET.unlink(missing_ok=True)
    print(f"the clients found the daemon {'at the default socket' if sock == DEFAULT_SOCKET else 'by OOMGUARD_SOCKET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
