"""What oom-protect costs: `oom-protect true` beside `choom -n -1000 -- true`
and the bare interpreter, `python3 -I -c pass`, timed in one run.

It needs a caller with CAP_SYS_RESOURCE (the client then writes its own
oom_score_adj and needs no daemon), so on a host without it the bench boots
the real-kernel guest and runs itself there:

    python3 bench/bench_protect.py [--runs N]

Prints the median of each command and the ratios. Under TCG every figure is
slow; only the ratios mean something.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def has_cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


def time_once(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=40)
    args = p.parse_args()
    if not has_cap_sys_resource():
        sys.path.insert(0, str(REPO / "tests" / "guest"))
        from harness import run_guest

        print("no CAP_SYS_RESOURCE here: running the bench in the real-kernel guest", flush=True)
        r = run_guest([sys.executable, str(Path(__file__).resolve()), "--runs", str(args.runs)],
                      timeout=900, stream=sys.stdout, cwd=REPO)
        return r.returncode
    commands = {
        "oom-protect true": [str(BIN / "oom-protect"), "true"],
        "choom -n -1000 -- true": ["choom", "-n", "-1000", "--", "true"],
        "python3 -I -c pass": [sys.executable, "-I", "-c", "pass"],
    }
    out = subprocess.run(commands["oom-protect true"][:1] + ["cat", "/proc/self/oom_score_adj"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "-1000", out
    times: dict[str, list[float]] = {k: [] for k in commands}
    for argv in commands.values():  # warm the page cache
        time_once(argv)
    for _ in range(args.runs):  # interleaved, so drift hits all alike
        for name, argv in commands.items():
            times[name].append(time_once(argv))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["python3 -I -c pass"]
    print(f"{'command':<26}{'median':>10}{'vs python3 -I':>16}{'vs choom':>10}")
    for name, m in med.items():
        print(f"{name:<26}{m * 1000:>8.1f}ms{m / base:>15.2f}x{m / med['choom -n -1000 -- true']:>9.1f}x")
    print(f"runs={args.runs} uid={os.getuid()} python={sys.executable}")
    ratio = med["oom-protect true"] / base
    print(f"oom-protect / python3 -I: {ratio:.2f} (target <= 1.5)")
    print("modules the client imports beyond the interpreter's own start-up:", ", ".join(extra_imports()))
    return 0


def imported(argv: list[str]) -> set[str]:
    err = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True, text=True).stderr
    return {line.split("|")[-1].strip() for line in err.splitlines() if line.startswith("import time:")} - {"package"}


def extra_imports() -> list[str]:
    """python3 -X importtime on the installed script, against bare start-up."""
    script = str(BIN / "oom-protect")
    return sorted(imported([script, "true"]) - imported(["-c", "pass"]))


if __name__ == "__main__":
    sys.exit(main())
