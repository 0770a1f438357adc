"""The demo's story: the auto-healer's flagship scenario, played live as a
timeline (run as root in the real-kernel guest by demo/run).

A real shop (nginx -> php-fpm -> MariaDB) runs in an app cgroup with a tight
memory limit; `oomguard daemon` watches its URL. The shop's user runs a big
import under `oom-protect`, so the kernel's OOM killer must spare it:

  Case A  the import finishes within the grace: the kernel kills php-fpm and
          nginx for it, it completes, and when the grace expires the healer
          finds nothing to kill and restarts the services.
  Case B  the import stalls past the grace: it wants more than exists, only
          unkillable tasks are left, the cgroup livelocks, and when the grace
          expires the healer kills the import and restarts the services.

Every step is printed as it happens, with its time since the case began.
The scenario's code is tests/guest/flagship.py, which the real-kernel test
tests/guest/test_flagship_guest.py runs too. Figures go to
/results/flagship.json (the host's results directory).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "guest"))

from flagship import (  # noqa: E402
    APP_USER,
    GRACE,
    LIMIT,
    TERM_TIMEOUT,
    CaseResult,
    Flagship,
    exit_text,
    verdict,
    write_results,
)

WIDTH = 78


def out(text: str = "") -> None:
    print(text, flush=True)


def banner(text: str) -> None:
    out()
    out(f"== {text} " + "=" * max(3, WIDTH - len(text) - 4))


def secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def summary(res: CaseResult) -> None:
    f = res.figures
    out("   ---")
    out(f"   downtime: {secs(f['downtime_our_probe'])} by our probe "
        f"({secs(f['downtime_daemon'])} by oomguard's clock)")  # fmt: skip
    gone = f.get("expiry_to_protected_gone")
    if res.case == "A":
        if gone is not None:
            out(f"   the import finished ({exit_text(res.import_status)}) {secs(-gone)} before "
                f"the grace expired; the healer killed nothing")  # fmt: skip
    else:
        if res.livelock_seen:
            out(f"   livelock: oom +{res.livelock_seen['oom_per_second']}/s with oom_kill stuck at "
                f"{res.livelock_seen['oom_kill']}; oomguard reported it")  # fmt: skip
        out(f"   grace expiry -> protected import gone: {secs(gone)} "
            f"(SIGTERM ignored, SIGKILL after {TERM_TIMEOUT:g}s via cgroup.kill)")  # fmt: skip
    out(f"   grace expiry -> shop answering again: {secs(f.get('expiry_to_healthy_our_probe'))} "
        f"(restart of php-fpm and nginx included)")  # fmt: skip
    out(f"   healer loop: a tick every {f['healer_loop_period_mean_sampled']}s on average "
        f"(slowest {f['healer_loop_period_max_sampled']}s), longest tick "
        f"{f['healer_max_tick_seconds']:.3f}s")  # fmt: skip
    out(f"   MariaDB: pid {res.mariadb_pid_before} before, {res.mariadb_pid_after} after, "
        f"oom_score_adj {res.mariadb_adj}; kernel victims: "
        f"{', '.join(sorted({v['comm'] for v in res.victims}))} ({len(res.victims)})")  # fmt: skip


def main() -> int:
    started = time.monotonic()
    banner("oomguard: the auto-healer, live on a real kernel")
    out(f"A web shop runs inside an app cgroup limited to {LIMIT >> 20} MiB. Its user,")
    out(f"{APP_USER}, runs a memory-hungry import with `oom-protect`: the kernel may")
    out("kill anything in the cgroup but the import (and MariaDB, which the policy")
    out(f"also sets to -1000). oomguard's healer gives such an import a grace of {GRACE:g}s")
    out("(minutes in production, longer at night) before it steps in.")
    banner("Setting up")
    results: list[CaseResult] = []
    problems: dict[str, list[str]] = {}
    with Flagship(echo=lambda line: out("   " + line)) as fs:
        for case in ("A", "B"):
            banner({"A": "Case A: the import finishes within the grace",
                    "B": "Case B: the import stalls past the grace"}[case])  # fmt: skip
            res = fs.run_case(case)
            results.append(res)
            summary(res)
            problems[case] = verdict(res)
    results_dir = Path(os.environ.get("OOMGUARD_GUEST_RESULTS", "/results"))
    if results_dir.is_dir():
        write_results(results_dir / "flagship.json", results)
    banner("The end")
    for res in results:
        bad = problems[res.case]
        out(f"   {res.title}: " + ("as told" if not bad else "UNEXPECTED: " + "; ".join(bad)))
    out(f"   (the whole story took {time.monotonic() - started:.0f}s in the guest; figures in "
        f"{results_dir / 'flagship.json'})")  # fmt: skip
    return 0 if not any(problems.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
