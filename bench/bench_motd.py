"""What `oomguard motd` adds to a login: the whole command, as a user's
login shell runs it, beside the bare interpreter, `ps -p 1` and
`oomguard --version`, timed in one interleaved run.

A real daemon (temp config, socket reachable by nobody, policy not enforced,
no healer) answers from an event store seeded with ``--events`` events, a
tenth of them OOM kills of nobody's processes. Two motd cases:

- "nothing new": nobody has seen everything (the usual login);
- "notices": nothing was seen yet, so the last 7 days are summed up.

    python3 bench/bench_motd.py [--runs N] [--events N]

Needs root (to run the daemon and setpriv to nobody). Prints medians and the
ratios against `python3 -I -c pass`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def seed(db: Path, n: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from oomguard.forensics.events import EventStore

    store = EventStore(str(db), 30 * 86400, 10 * n + 1000)
    now = time.time()
    for i in range(n):
        ts = now - 86400 + i * 86400 / n
        if i % 10 == 0:
            store.add("oom_kill", {"victim_pid": 1000 + i, "victim_comm": "php", "victim_uid": NOBODY,
                                   "task_memcg": "/app.slice"}, ts=ts, uids=[NOBODY])  # fmt: skip
        else:
            store.add("grant", {"id": i, "uid": 1000, "user": "app", "command": "php import.php"},
                      ts=ts, uids=[1000])  # fmt: skip
    store.close()


def start_daemon(base: Path) -> tuple[subprocess.Popen, str]:
    sock = str(base / "run" / "protect.sock")
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
[policy]
enforce = false
[healer]
enabled = false
""")
    log = open(base / "daemon.log", "wb")  # noqa: SIM115 - lives as long as the daemon
    proc = subprocess.Popen([str(BIN / "oomguard"), "--config", str(cfg), "daemon"], stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock)
            return proc, sock
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the daemon did not start:\n{(base / 'daemon.log').read_text()}")


def time_once(argv: list[str], env: dict[str, str], before=None) -> tuple[float, str]:
    if before is not None:
        before()
    start = time.perf_counter()
    out = subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         env=env).stdout  # fmt: skip
    return time.perf_counter() - start, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--events", type=int, default=20000)
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: it runs a daemon and setpriv to nobody")
    base = Path(tempfile.mkdtemp(prefix="oomguard-bench-motd-", dir="/tmp"))
    base.chmod(0o755)
    (base / "state").mkdir()
    home = base / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    seen = home / ".local" / "state" / "oomguard" / "motd-seen"
    seed(base / "state" / "events.db", args.events)
    daemon, sock = start_daemon(base)
    try:
        (base / "run").chmod(0o755)
        env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(home), "OOMGUARD_SOCKET": sock, "LANG": "C.UTF-8"}
        motd = AS_NOBODY + [str(BIN / "oomguard"), "motd"]
        cases = {
            "python3 -I -c pass": (AS_NOBODY + [sys.executable, "-I", "-c", "pass"], None),
            "ps -p 1": (AS_NOBODY + ["ps", "-p", "1"], None),
            "oomguard --version": (AS_NOBODY + [str(BIN / "oomguard"), "--version"], None),
            "oomguard motd (nothing new)": (motd, None),
            "oomguard motd (notices)": (motd, lambda: seen.unlink(missing_ok=True)),
        }
        _, first = time_once(motd, env, lambda: seen.unlink(missing_ok=True))
        assert "the kernel's OOM killer killed your process php" in first, first
        _, again = time_once(motd, env)
        assert again == "", again  # each notice once
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.runs):  # interleaved, so drift hits all alike
            for name, (argv, before) in cases.items():
                times[name].append(time_once(argv, env, before)[0])
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(20)
        shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    base_t = med["python3 -I -c pass"]
    print(f"{'command (as nobody)':<30}{'median':>10}{'vs python3 -I':>16}{'vs ps':>8}")
    for name, m in med.items():
        print(f"{name:<30}{m * 1000:>8.1f}ms{m / base_t:>15.2f}x{m / med['ps -p 1']:>7.1f}x")
    print(f"runs={args.runs} events in the store={args.events} python={sys.executable}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
