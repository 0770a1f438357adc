#!/usr/bin/env python3
"""An exec storm: what the policy enforcer costs at N execs/s by the app user.

One command does it all. A spawner running as the app user (nobody) starts
``--rate`` short-lived processes per second (a private copy of true) and,
every ``--every``-th one, a long-lived one (a private copy of sleep), for
``--seconds``. The process under test runs in a process of its own, fed by
the real process-event connector, with an (empty) run registry as in the
daemon; its CPU (utime + stime of all threads, /proc/PID/stat) is read over
the storm and one second after it, and divided by the storm's length:

- ``bare``: a loop that reads and parses the same events and does nothing
  with them, the floor any event consumer pays;
- ``before``: the enforcer of ``--ref`` (git archive of that commit), each
  event handled at once;
- ``now, at once``: this tree's enforcer with no delay (each event at once,
  indexed by pid);
- ``now, as the daemon``: this tree's enforcer as the daemon runs it (looks
  after ``EVENT_DELAY``, none for what exited, in batches).

The class is +500 for the two binaries run by nobody: a raise needs no
CAP_SYS_RESOURCE. Each long-lived process must read 500 at the end.

    sudo python3 bench/bench_exec_storm.py [--rate 1000] [--seconds 10]
        [--rounds 3] [--every 100] [--ref c485a51]
    sudo python3 bench/bench_exec_storm.py --idle 70 [--sleepers 10000]

--idle: no storm; each variant's CPU and wakeups (context switches of all
its threads) over that many seconds, with --sleepers sleeping processes on
the box (the old enforcer walked /proc every 60 s: give it more than that).

Needs root (the connector, and the spawner's setuid). Medians over the
rounds; the rounds of the variants alternate, so noise hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")
VALUE = 500
APP_UID = 65534  # nobody
GOAL = 0.10

# The process under test: "bare", or the enforcer with a delay ("-": none
# given, as the old one takes; "daemon": EVENT_DELAY, as from_config gives).
CONSUMER = r"""
import json, signal, sys, tempfile, threading
from pathlib import Path
from oomguard.host import procevents
mode, delay = sys.argv[1], sys.argv[2]
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
pe = procevents.ProcEvents()
pe.open()
stats = {}
if mode == "bare":
    n = [0]
    def callback(ev):
        n[0] += 1
    stats_of = lambda: {"events": n[0]}
else:
    from oomguard.config import parse_policy_class
    from oomguard.policy.enforcer import Enforcer
    from oomguard.runs.registry import RunRegistry
    cls = parse_policy_class({"name": "storm", "oom_score_adj": VALUE,
                              "comm": ["oomgstorm-*"], "user": [APP_UID]}, "bench")
    reg = RunRegistry(Path(tempfile.mkdtemp()) / "runs.json", deferred=True)
    if delay == "daemon":
        from oomguard.policy.enforcer import EVENT_DELAY
        delay = str(EVENT_DELAY)
    kw = {} if delay == "-" else {"delay": float(delay)}
    enf = Enforcer((cls,), reg, self_pid=0, **kw)
    enf.poll_once(full=True)  # what the daemon does before it listens
    threading.Thread(target=enf.run_upkeep, args=(stop,), daemon=True).start()
    callback = enf.handle
    stats_of = lambda: {k: v for k, v in vars(enf.stats).items()}
print("ready", flush=True)
pe.run(callback, stop)
print(json.dumps(stats_of()), flush=True)
""".replace("VALUE", str(VALUE)).replace("APP_UID", str(APP_UID))

# The storm, as the app user: argv rate seconds every short long.
SPAWNER = r"""
import json, os, sys, time
rate, secs, every = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
short, long_ = sys.argv[4], sys.argv[5]
env = {"PATH": "/usr/bin:/bin"}
longs, n, t0 = [], 0, time.monotonic()
while True:
    now = time.monotonic() - t0
    if now >= secs:
        break
    due = n / rate
    if due > now:
        time.sleep(due - now)
    if n % every == every - 1:
        longs.append(os.posix_spawn(long_, [long_, "600"], env))
    else:
        os.posix_spawn(short, [short], env)
    n += 1
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
elapsed = time.monotonic() - t0
print(json.dumps({"n": n, "seconds": elapsed, "long": longs}), flush=True)
sys.stdin.read()  # keep the long-lived ones' parent until told
"""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime of all threads


def wakeups(pid: int) -> int:
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    n += int(line.split()[1])
    return n


def idle_round(src: Path, mode: str, delay: str, seconds: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    consumer = subprocess.Popen([sys.executable, "-c", CONSUMER, mode, delay], env=env,
                                stdout=subprocess.PIPE, text=True)
    assert consumer.stdout is not None
    if consumer.stdout.readline().strip() != "ready":
        raise SystemExit(f"{mode}: the consumer did not start")
    time.sleep(2.0)  # its start-up walk is not idle
    c0, w0 = cpu_seconds(consumer.pid), wakeups(consumer.pid)
    time.sleep(seconds)
    cpu, woke = cpu_seconds(consumer.pid) - c0, wakeups(consumer.pid) - w0
    consumer.send_signal(signal.SIGTERM)
    consumer.communicate(timeout=30)
    return {"cpu_per_min": cpu / seconds * 60, "wakeups": woke / seconds}


def export_ref(ref: str, into: Path) -> Path | None:
    """The src/ tree of a commit, for the "before" variant."""
    out = into / "ref"
    out.mkdir()
    try:
        git = subprocess.Popen(["git", "-C", str(ROOT), "archive", ref, "src"], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)
        subprocess.run(["tar", "-x", "-C", str(out)], stdin=git.stdout, check=True)
        if git.wait() != 0:
            return None
    except (OSError, subprocess.CalledProcessError):
        return None
    return out / "src"


def one_round(src: Path, mode: str, delay: str, args: argparse.Namespace, bins: tuple[Path, Path]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    consumer = subprocess.Popen([sys.executable, "-c", CONSUMER, mode, delay], env=env,
                                stdout=subprocess.PIPE, text=True)
    assert consumer.stdout is not None
    if consumer.stdout.readline().strip() != "ready":
        raise SystemExit(f"{mode}: the consumer did not start")
    time.sleep(1.0)  # its start-up walk is not the storm's cost
    c0 = cpu_seconds(consumer.pid)
    spawners = [subprocess.Popen(
        [sys.executable, "-c", SPAWNER, str(args.rate / args.spawners), str(args.seconds), str(args.every),
         *map(str, bins)],
        user=APP_UID, group=APP_UID, extra_groups=[], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd="/",
    ) for _ in range(args.spawners)]
    storms = [json.loads(sp.stdout.readline()) for sp in spawners]  # type: ignore[union-attr]
    storm = {"n": sum(x["n"] for x in storms), "seconds": max(x["seconds"] for x in storms),
             "long": [pid for x in storms for pid in x["long"]]}
    time.sleep(1.0)  # the last looks are due 50 ms after the storm; a second covers it
    cpu = cpu_seconds(consumer.pid) - c0
    right = 0
    for pid in storm["long"]:
        try:
            with open(f"/proc/{pid}/oom_score_adj") as f:
                right += int(f.read()) == VALUE
        except OSError:
            pass
    consumer.send_signal(signal.SIGTERM)
    out, _ = consumer.communicate(timeout=30)
    for pid in storm["long"]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for sp in spawners:
        sp.stdin.close()  # type: ignore[union-attr]
        sp.wait(30)
    return {"cpu": cpu / storm["seconds"], "us_per_exec": cpu / storm["n"] * 1e6, "rate": storm["n"] / storm["seconds"], "right": right,
            "long": len(storm["long"]), "stats": json.loads(out.strip().splitlines()[-1] or "{}")}


def idle(variants: list[tuple[str, Path, str, str]], args: argparse.Namespace) -> int:
    sleepers = [subprocess.Popen(["sleep", "3600"]) for _ in range(args.sleepers)]
    try:
        rows = [(name, idle_round(src, mode, delay, args.idle)) for name, src, mode, delay in variants]
    finally:
        for p in sleepers:
            p.kill()
            p.wait()
    print(f"\nidle: {args.idle:g} s, {args.sleepers} sleepers, {len(os.listdir('/proc'))} /proc entries after")
    print(f"{'variant':<24} {'CPU s/min':>10} {'wakeups/s':>10}")
    for name, r in rows:
        print(f"{name:<24} {r['cpu_per_min']:10.3f} {r['wakeups']:10.1f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=1000.0, help="execs per second")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--every", type=int, default=100, help="one long-lived process per this many")
    ap.add_argument("--spawners", type=int, default=2, help="processes sharing the rate")
    ap.add_argument("--idle", type=float, default=0.0, help="seconds of idle measurement instead of a storm")
    ap.add_argument("--sleepers", type=int, default=0, help="sleeping processes during --idle")
    ap.add_argument("--ref", default="c485a51", help="the commit whose enforcer is 'before'")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root: the process-event connector, and a spawner running as nobody")
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="oomgstorm."))
    tmp.chmod(0o755)
    bins = (tmp / "oomgstorm-t", tmp / "oomgstorm-s")
    shutil.copy2(shutil.which("true") or "/bin/true", bins[0])
    shutil.copy2(shutil.which("sleep") or "/bin/sleep", bins[1])
    try:
        variants = [("bare event loop", ROOT / "src", "bare", "-")]
        ref = export_ref(args.ref, tmp)
        if ref is not None:
            variants.append((f"before ({args.ref})", ref, "enforcer", "-"))
        else:
            print(f"(no git checkout of {args.ref}: the 'before' line is left out)")
        variants += [("now, at once", ROOT / "src", "enforcer", "0"),
                     ("now, as the daemon", ROOT / "src", "enforcer", "daemon")]
        if args.idle:
            return idle(variants, args)
        results: dict[str, list[dict]] = {v[0]: [] for v in variants}
        for r in range(args.rounds):
            for name, src, mode, delay in variants:
                res = one_round(src, mode, delay, args, bins)
                results[name].append(res)
                print(f"  round {r + 1} {name:<22} {res['cpu']:.3f} core at {res['rate']:.0f}/s "
                      f"({res['us_per_exec']:.1f} us/exec), "
                      f"long-lived right {res['right']}/{res['long']}", flush=True)

        print(f"\nexec storm: {args.rate:g}/s asked, {args.seconds:g} s, {args.rounds} rounds, "
              f"{os.cpu_count()} cores, {len(os.listdir('/proc'))} /proc entries")
        # A costlier consumer slows the spawners down on a small box, so the
        # fair comparison is CPU per exec; "at 1,000/s" projects it to the goal's rate.
        def med(name: str, key: str) -> float:
            return statistics.median(x[key] for x in results[name])

        base = med(variants[0][0], "us_per_exec")
        before = med(variants[1][0], "us_per_exec") if ref is not None else None
        print(f"{'variant':<24} {'execs/s':>8} {'core':>6} {'us/exec':>8} {'at 1,000/s':>10} {'vs bare':>8} "
              f"{'vs before':>10} {'long-lived right':>17}  looks/dropped")
        for name, *_ in variants:
            xs = results[name]
            us = med(name, "us_per_exec")
            right = f"{sum(x['right'] for x in xs)}/{sum(x['long'] for x in xs)}" if name != variants[0][0] else "-"
            vs_before = f"{us / before:.2f}x" if before else "-"
            st = xs[-1]["stats"]
            extra = f"{st.get('looks', '-')}/{st.get('dropped', '-')}" if "polls" in st else ""
            print(f"{name:<24} {med(name, 'rate'):8.0f} {med(name, 'cpu'):6.3f} {us:8.1f} {us / 1000:10.3f} "
                  f"{us / base if base else 0:7.2f}x {vs_before:>10} {right:>17}  {extra}")
        print(f"goal: at most {GOAL:.2f} of a core at 1,000 execs/s, every long-lived process right")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
