"""What an idle daemon costs: oomguard beside earlyoom and nohang, side by side.

Each runs by hand with its Debian default configuration (earlyoom -r 3600, as
/etc/default/earlyoom; nohang --monitor --config /etc/nohang/nohang.conf, as
its unit), never as a service. oomguard runs with every feature on: the
broker's socket, the policy enforcer on process events, the healer with an
HTTP check of a loopback page, the kernel log watch, the event store and the
metrics server (--lean: no exporter, a TCP check). All three run at once,
so the machine's noise hits them alike; after a warm-up each is sampled
over the same window:

- RSS and PSS (/proc/PID/smaps_rollup),
- CPU seconds per minute (utime + stime of all threads),
- wakeups per second (voluntary + involuntary context switches of all threads).

With --procs the box first gets that many sleeping processes (default: 0,
then 1000, 5000, 10000: cost should stay flat in the process count).
With --threads, oomguard's threads are named for the kernel (a
sitecustomize on its PYTHONPATH sets each Python thread's name as its comm)
and its wake-ups and CPU are also listed per thread, to say where they go
(that sitecustomize imports ctypes: read RSS from a run without --threads).
Another load on the box (other tests forking) shows up in oomguard's
procevents and policy threads: --forks prints the box's fork rate beside.

    python3 bench/bench_idle.py [--seconds 60] [--procs 0,1000,5000,10000] [--threads]

Needs root, and earlyoom and nohang installed (apt install earlyoom nohang,
with a policy-rc.d that keeps them from starting as services).
"""

from __future__ import annotations

import argparse
import http.server
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def oomguard_config(base: Path, page_port: int, metrics_port: int, lean: bool = False) -> Path:
    cfg = base / "oomguard.toml"
    listen = "" if lean else f"127.0.0.1:{metrics_port}"
    check = f'tcp = "127.0.0.1:{page_port}"' if lean else f'http = "http://127.0.0.1:{page_port}/"'
    cfg.write_text(
        f"""
[daemon]
state_dir = "{base / "state"}"
[protect]
socket = "{base / "protect.sock"}"
[events]
db = "{base / "state" / "events.db"}"
[metrics]
listen = "{listen}"
[healer]
window = []
[[healer.check]]
name = "shop"
{check}
interval = "5s"
timeout = "2s"
"""
    )
    return cfg


class Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


NAME_THREADS = """\
import ctypes, threading
_prctl = ctypes.CDLL(None).prctl
_inner = threading.Thread._bootstrap_inner
def _named(self):
    _prctl(15, self.name[:15].encode(), 0, 0, 0)  # PR_SET_NAME
    return _inner(self)
threading.Thread._bootstrap_inner = _named
"""


def per_thread(pid: int) -> dict[str, tuple[int, int]]:
    """comm -> (context switches, CPU ticks), summed over threads of that name."""
    out: dict[str, tuple[int, int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines()
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except FileNotFoundError:
            continue
        sw = sum(int(line.split()[1]) for line in status if "ctxt_switches" in line)
        fields = stat[stat.rindex(")") + 2 :].split()
        old = out.get(comm, (0, 0))
        out[comm] = (old[0] + sw, old[1] + int(fields[11]) + int(fields[12]))
    return out


def forks() -> int:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("processes "):
            return int(line.split()[1])
    return 0


def sample(pid: int) -> tuple[float, int]:
    """(CPU seconds, context switches) of all threads of ``pid``."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICK
    switches = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    switches += int(line.split()[1])
        except FileNotFoundError:
            pass
    return cpu, switches


def memory(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MiB."""
    rss = pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss / 1024, pss / 1024


def sleepers(n: int) -> subprocess.Popen | None:
    if n <= 0:
        return None
    script = f"i=0; while [ $i -lt {n} ]; do sleep 36000 & i=$((i+1)); done; echo ready; wait"
    shell = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, start_new_session=True)
    assert shell.stdout is not None
    shell.stdout.readline()
    return shell


def stop(proc: subprocess.Popen | None, group: bool = False) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.terminate()
        proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()


def measure(subjects: dict[str, subprocess.Popen], warmup: float, seconds: float) -> dict[str, dict]:
    time.sleep(warmup)
    for name, proc in subjects.items():
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited during the warm-up (status {proc.returncode})")
    t0 = time.monotonic()
    first = {n: sample(p.pid) for n, p in subjects.items()}
    threads0, forks0 = per_thread(subjects["oomguard"].pid), forks()
    mem: dict[str, list[tuple[float, float]]] = {n: [] for n in subjects}
    while time.monotonic() - t0 < seconds:
        for n, p in subjects.items():
            mem[n].append(memory(p.pid))
        time.sleep(min(5.0, seconds / 4))
    elapsed = time.monotonic() - t0
    threads1 = per_thread(subjects["oomguard"].pid)
    out: dict[str, dict] = {
        "_threads": {
            comm: ((sw - threads0.get(comm, (0, 0))[0]) / elapsed, (cpu - threads0.get(comm, (0, 0))[1]) / TICK / elapsed * 60)
            for comm, (sw, cpu) in threads1.items()
        },
        "_forks": {"per_second": (forks() - forks0) / elapsed},
    }
    for n, p in subjects.items():
        cpu, sw = sample(p.pid)
        out[n] = {
            "rss": statistics.median(m[0] for m in mem[n]),
            "pss": statistics.median(m[1] for m in mem[n]),
            "cpu_per_min": (cpu - first[n][0]) / elapsed * 60,
            "wakeups": (sw - first[n][1]) / elapsed,
        }
    return out


def report(procs: int, r: dict[str, dict], threads: bool) -> None:
    per_thread_figures = r.pop("_threads")
    box_forks = r.pop("_forks")["per_second"]
    print(f"\n{procs} extra sleeping processes (the box forked {box_forks:.0f} times a second meanwhile)")
    print(f"{'':10} {'RSS MiB':>8} {'PSS MiB':>8} {'CPU s/min':>10} {'wakeups/s':>10}")
    for n, v in r.items():
        print(f"{n:10} {v['rss']:8.1f} {v['pss']:8.1f} {v['cpu_per_min']:10.3f} {v['wakeups']:10.1f}")
    og = r["oomguard"]
    for peer in ("earlyoom", "nohang"):
        p = r[peer]

        def ratio(key: str, p: dict = p) -> str:
            return f"{og[key] / p[key]:.1f}x" if p[key] > 0 else "-"

        print(f"oomguard / {peer}: RSS {ratio('rss')}, PSS {ratio('pss')}, "
              f"CPU {ratio('cpu_per_min')}, wakeups {ratio('wakeups')}")  # fmt: skip
    if threads:
        print(f"oomguard by thread {'wakeups/s':>14} {'CPU s/min':>10}")
        for comm, (sw, cpu) in sorted(per_thread_figures.items(), key=lambda kv: -kv[1][0]):
            print(f"  {comm:<16} {sw:16.1f} {cpu:10.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=15.0)
    ap.add_argument("--procs", default="0,1000,5000,10000")
    ap.add_argument("--threads", action="store_true", help="also list oomguard's wake-ups and CPU per thread")
    ap.add_argument("--lean", action="store_true",
                    help="oomguard without the metrics exporter and with a TCP check instead of HTTP "
                         "(neither prometheus_client nor http.client and its ssl is imported)")  # fmt: skip
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_idle: run as root")
    for tool in ("earlyoom", "nohang"):
        if not shutil.which(tool):
            raise SystemExit(f"bench_idle: {tool} is not installed (apt install earlyoom nohang)")
    page = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=page.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory(prefix="oomguard-bench-idle-") as d:
        base = Path(d)
        cfg = oomguard_config(base, page.server_port, free_port(), args.lean)
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        og_env = dict(os.environ)
        if args.threads:
            (base / "site").mkdir()
            (base / "site" / "sitecustomize.py").write_text(NAME_THREADS)
            og_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(base / "site"), og_env.get("PYTHONPATH")) if p)
        for n in [int(x) for x in args.procs.split(",") if x.strip()]:
            crowd = sleepers(n)
            subjects = {}
            try:
                subjects = {
                    "oomguard": subprocess.Popen([str(BIN / "oomguard"), "--config", str(cfg), "daemon"], env=og_env, **quiet),
                    "earlyoom": subprocess.Popen(["earlyoom", "-r", "3600"], **quiet),
                    "nohang": subprocess.Popen(["nohang", "--monitor", "--config", "/etc/nohang/nohang.conf"], **quiet),
                }
                report(n, measure(subjects, args.warmup, args.seconds), args.threads)
            finally:
                for p in subjects.values():
                    stop(p)
                stop(crowd, group=True)
    page.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
