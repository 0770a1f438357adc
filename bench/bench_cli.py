"""What an admin query costs to start: `oomguard runs|events|status|motd`
timed as the whole command a user types, beside `python3 -I -c pass`.

Each command is a fresh process (the venv's console script, as installed),
run N times interleaved with the reference; medians are compared. A stub
daemon answers on a Unix socket with fixed replies shaped like the real
daemon's, so only the client is measured. The socket is found as an
installed host finds it: the shipped config (contrib/config/oomguard.toml,
which leaves [protect] socket commented out) given with --config and the
stub at the default socket path, /run/oomguard/protect.sock, when that path
is free (root); otherwise through OOMGUARD_SOCKET.

With --compare SRC each command also runs with PYTHONPATH=SRC (e.g. an
exported older tree, `git archive REV src | tar -x -C /tmp/old`),
interleaved with the rest, and its column is printed beside.

    python3 bench/bench_cli.py [-n 30] [--python /usr/bin/python3] [--compare SRC]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
DEFAULT_SOCKET = Path("/run/oomguard/protect.sock")
NOW = time.time()

RUN = {"id": 3, "user": "shopuser", "uid": 1001, "pid": 900, "command": "php bin/magento import:products big.csv",
       "cgroup": "/oomguard.app/oomguard-run-3", "tty": None, "started": NOW - 60, "ended": None,
       "exit_status": None, "peak_memory": None, "end_reason": None}  # fmt: skip
EVENT = {"id": 7, "ts": NOW - 30, "kind": "oom_kill", "uids": [1001],
         "data": {"victim_pid": 4242, "victim_comm": "php-fpm8.2", "victim_uid": 1001, "anon_rss_kb": 181244,
                  "oom_memcg": "/oomguard.app", "protected_runs": [{"id": 3, "user": "shopuser"}]}}  # fmt: skip
STATUS = {
    "memory": {"total": 1 << 30, "available": 300 << 20},
    "app": {"cgroup": "/oomguard.app", "current": 400 << 20, "max": 448 << 20, "oom": 3, "oom_kill": 2},
    "pressure": {"some_avg10": 1.5, "full_avg10": 0.25},
    "protected": [{"pid": 900}], "runs": [RUN],
    "healer": {"phase": "watching", "window": "default", "grace": 180.0, "down": False,
               "checks": {"shop": {"healthy": True, "down": False, "detail": "HTTP 200"}}},
    "last_oom_kills": [EVENT],
    "daemon": {"pid": 321, "process_events": "events"},
}  # fmt: skip
REPLIES = {
    "runs": {"ok": True, "runs": [RUN]},
    "events": {"ok": True, "events": [EVENT], "next": None},
    "status": {"ok": True, **STATUS},
}


def serve(path: Path) -> socket.socket:
    """The stub daemon: one JSON line in, one reply out, connection closed."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    os.chmod(path, 0o666)
    srv.listen(64)

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                op = json.loads(buf or b"{}").get("op")
                conn.sendall(json.dumps(REPLIES.get(op, {"ok": False, "error": f"unknown op {op}"})).encode())

    threading.Thread(target=loop, daemon=True).start()
    return srv


def timed(argv: list[str], env: dict[str, str]) -> float:
    """Wall time of one whole command, from fork to exit."""
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=30, help="runs of each command (default 30)")
    ap.add_argument("--python", default="/usr/bin/python3", help="the bare interpreter of the reference")
    ap.add_argument("--oomguard", default=str(BIN / "oomguard"), help="the console script to time")
    ap.add_argument("--compare", metavar="SRC", help="also time each command with PYTHONPATH=SRC")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "OOMGUARD_SOCKET"}
    with tempfile.TemporaryDirectory(prefix="oomguard-bench-cli-") as d:
        tmp = Path(d)
        cfg = tmp / "oomguard.toml"
        cfg.write_bytes((REPO / "contrib/config/oomguard.toml").read_bytes())
        made_dir = False
        if os.geteuid() == 0 and not DEFAULT_SOCKET.exists():
            made_dir = not DEFAULT_SOCKET.parent.exists()
            DEFAULT_SOCKET.parent.mkdir(parents=True, exist_ok=True)
            sock_path, how = DEFAULT_SOCKET, "default socket path, shipped config"
        else:
            sock_path, how = tmp / "protect.sock", "OOMGUARD_SOCKET, shipped config"
            env["OOMGUARD_SOCKET"] = str(sock_path)
        srv = serve(sock_path)
        env["HOME"] = str(tmp)  # motd remembers what it showed here
        og = [args.oomguard, "--config", str(cfg)]
        commands = {
            "runs": [*og, "runs"],
            "runs --json": [*og, "runs", "--json"],
            "events": [*og, "events"],
            "events --since 1d": [*og, "events", "--since", "1d"],
            "status": [*og, "status"],
            "motd": [args.oomguard, "motd"],
        }
        ref_argv = [args.python, "-I", "-c", "pass"]
        old_env = dict(env, PYTHONPATH=args.compare) if args.compare else None
        try:
            for argv in [ref_argv, *commands.values()]:  # warm the page cache; fail early
                timed(argv, env)
                if old_env is not None:
                    timed(argv, old_env)
            ref: list[float] = []
            times: dict[str, list[float]] = {name: [] for name in commands}
            old: dict[str, list[float]] = {name: [] for name in commands}
            for _ in range(args.n):  # interleaved: drifts in the machine's load hit all alike
                ref.append(timed(ref_argv, env))
                for name, argv in commands.items():
                    times[name].append(timed(argv, env))
                    if old_env is not None:
                        old[name].append(timed(argv, old_env))
        finally:
            srv.close()
            sock_path.unlink(missing_ok=True)
            if made_dir:
                DEFAULT_SOCKET.parent.rmdir()
    base = statistics.median(ref)
    print(f"{args.n} runs each, medians; socket: {how}")
    extra = f" {'compared ms':>12} {'ratio':>7} {'speed-up':>9}" if args.compare else ""
    print(f"{'command':<24} {'median ms':>10} {'ratio':>7}{extra}   (goal <= 2.0x)")
    print(f"{'python3 -I -c pass':<24} {base * 1000:10.1f} {1.0:6.2f}x")
    for name, ts in times.items():
        m = statistics.median(ts)
        line = f"{'oomguard ' + name:<24} {m * 1000:10.1f} {m / base:6.2f}x"
        if args.compare:
            o = statistics.median(old[name])
            line += f" {o * 1000:12.1f} {o / base:6.2f}x {o / m:8.2f}x"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
