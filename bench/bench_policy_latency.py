#!/usr/bin/env python3
"""Exec-to-applied latency of the policy Enforcer, on the host.

Starts an Enforcer whose only class matches a private copy of sleep
("oomglat-*", +500: a positive value, which needs no CAP_SYS_RESOURCE),
then spawns that binary again and again and measures the time from just
before the spawn until /proc/<pid>/oom_score_adj reads the class value.

    python3 bench/bench_policy_latency.py [--mode poll|events|both]
        [--interval 2.0] [--samples 20] [--delay S|daemon]
        [--sleepers N] [--walk-every S] [--src DIR]

--delay: the enforcer's wait before a look (default none: each event at
once; "daemon": EVENT_DELAY, as the daemon runs it). --sleepers: that many
sleeping processes first. --walk-every: a thread walks all of /proc every S
seconds meanwhile (what lost events or a request make it do; before, a 60 s
timer did it under the enforcer's lock), so the worst figure shows whether
events wait behind a walk. --src: the code tree to measure (an exported old
commit, for a before/after).

The clock starts before fork, so every figure includes the spawn itself;
the "spawn only" line is that cost alone. Polling samples are spaced at
random so they do not lock onto the polling phase. Run as root: events
need the process-event connector, and only root may subscribe.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

_SRC = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--src=")), None)
sys.path.insert(0, _SRC or str(Path(__file__).resolve().parents[1] / "src"))

from oomguard.config import parse_policy_class  # noqa: E402
from oomguard.host import procfs  # noqa: E402
from oomguard.policy.enforcer import Enforcer  # noqa: E402

VALUE = 500
# self_pid=0 below: the bench process is not the daemon, so no self-class.
CLASSES = (parse_policy_class({"name": "bench", "oom_score_adj": VALUE, "comm": ["oomglat-*"]}, "bench"),)


# ----------------------------------------------------------------- drivers


def start_polling(enf: Enforcer, stop: threading.Event, interval: float) -> threading.Thread:
    t = threading.Thread(target=enf.run_polling, args=(stop, interval), daemon=True)
    t.start()
    return t


# >>> EVENT HOOK: the event-driven driver. procevents.ProcEvents().run(callback,
# stop) delivers ("fork", parent, child) / ("exec", pid) / ("uid", ...) /
# ("exit", pid, status) / ("lost",) tuples; Enforcer.handle takes them as
# they are. Swap this function to measure another event source.
def start_events(enf: Enforcer, stop: threading.Event) -> threading.Thread:
    from oomguard.host import procevents

    pe = procevents.ProcEvents()
    pe.open()  # raises OSError without root or connector: let the caller say so
    t = threading.Thread(target=pe.run, args=(enf.handle, stop), daemon=True)
    t.start()
    # the daemon's second thread: the delayed looks (an old enforcer: its timer)
    threading.Thread(target=enf.run_upkeep, args=(stop, 3600.0), daemon=True).start()
    return t


def start_walks(enf: Enforcer, stop: threading.Event, every: float) -> list[float]:
    """A walk of /proc every ``every`` s; returns the list of their durations."""
    took: list[float] = []

    def loop() -> None:
        while not stop.wait(every):
            t = time.perf_counter()
            enf.resync()
            took.append(time.perf_counter() - t)

    threading.Thread(target=loop, daemon=True).start()
    return took
# <<< EVENT HOOK


# ----------------------------------------------------------------- measuring


def wait_value(pid: int, value: int, timeout: float) -> float | None:
    path = f"/proc/{pid}/oom_score_adj"
    deadline = time.perf_counter() + timeout
    while True:
        try:
            with open(path, "rb", buffering=0) as f:
                if int(f.read()) == value:
                    return time.perf_counter()
        except (FileNotFoundError, ValueError):
            pass
        if time.perf_counter() > deadline:
            return None
        time.sleep(0.0002)


def measure(binary: Path, samples: int, spacing: Callable[[], float], timeout: float) -> list[float]:
    out = []
    for _ in range(samples):
        time.sleep(spacing())
        t0 = time.perf_counter()
        child = subprocess.Popen([str(binary), "30"])
        try:
            t1 = wait_value(child.pid, VALUE, timeout)
            if t1 is not None:
                out.append(t1 - t0)
        finally:
            child.kill()
            child.wait()
    return out


def spawn_cost(binary: Path, samples: int) -> list[float]:
    out = []
    for _ in range(samples):
        t0 = time.perf_counter()
        child = subprocess.Popen([str(binary), "30"])
        out.append(time.perf_counter() - t0)
        child.kill()
        child.wait()
    return out


def report(name: str, xs: list[float], asked: int) -> None:
    if not xs:
        print(f"{name:<28} no sample reached the value")
        return
    ms = sorted(x * 1000 for x in xs)
    p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
    print(f"{name:<28} n={len(ms)}/{asked} median {statistics.median(ms):8.2f} ms  "
          f"p90 {p90:8.2f} ms  min {ms[0]:7.2f}  max {ms[-1]:8.2f}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("poll", "events", "both"), default="both")
    ap.add_argument("--interval", type=float, default=2.0, help="polling interval (the config default)")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--delay", default=None, help='seconds, or "daemon" (EVENT_DELAY)')
    ap.add_argument("--sleepers", type=int, default=0)
    ap.add_argument("--walk-every", type=float, default=0.0)
    ap.add_argument("--src", default=None, help="the code tree (read before import, as --src=DIR)")
    args = ap.parse_args()
    kw = {}
    if args.delay == "daemon":
        from oomguard.policy.enforcer import EVENT_DELAY

        kw["delay"] = EVENT_DELAY
    elif args.delay is not None:
        kw["delay"] = float(args.delay)

    tmp = Path(tempfile.mkdtemp(prefix="oomglat."))
    binary = tmp / "oomglat-sleep"
    shutil.copy2(shutil.which("sleep"), binary)
    sleepers = [subprocess.Popen(["sleep", "3600"]) for _ in range(args.sleepers)]
    try:
        print(f"host: {len(procfs.list_pids())} processes, CAP_SYS_RESOURCE={procfs.has_cap_sys_resource()}")
        report("spawn only (no enforcer)", spawn_cost(binary, args.samples), args.samples)

        # what one polling round costs on this host
        enf = Enforcer(CLASSES, None, self_pid=0)
        t = time.perf_counter()
        enf.poll_once(full=True)
        full = time.perf_counter() - t
        t = time.perf_counter()
        enf.poll_once(full=False)
        quick = time.perf_counter() - t
        print(f"poll_once: full sweep {full * 1000:.1f} ms, incremental {quick * 1000:.1f} ms")

        if args.mode in ("poll", "both"):
            stop = threading.Event()
            enf = Enforcer(CLASSES, None, self_pid=0)
            th = start_polling(enf, stop, args.interval)
            time.sleep(0.2)
            xs = measure(binary, args.samples, lambda: random.uniform(0, args.interval), args.interval * 3 + 5)
            stop.set()
            th.join()
            report(f"polling every {args.interval:g} s", xs, args.samples)

        if args.mode in ("events", "both"):
            stop = threading.Event()
            enf = Enforcer(CLASSES, None, self_pid=0, **kw)
            enf.poll_once(full=True)  # as the daemon, before it listens
            try:
                th = start_events(enf, stop)
            except OSError as e:
                print(f"events: unavailable here ({e}); run as root on a kernel with the connector")
            else:
                time.sleep(0.2)
                walks = start_walks(enf, stop, args.walk_every) if args.walk_every else []
                xs = measure(binary, args.samples, lambda: random.uniform(0.01, 0.05), 5.0)
                stop.set()
                th.join()
                report("process events", xs, args.samples)
                if walks:
                    print(f"  {len(walks)} walks of /proc meanwhile, median {statistics.median(walks) * 1000:.0f} ms")
                print(f"  enforcer saw {enf.stats.events} events, wrote {enf.stats.writes} values")
    finally:
        for p in sleepers:
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
