"""The packaged oom-protect's start-up beside the bare system interpreter
(and beside the venv's pip-installed client on the interpreter that runs
this), on the host, without the guest:

    python3 bench/bench_package.py [--deb dist/oomguard_*.deb] [--runs N]

It unpacks the .deb (``dpkg-deb -x``, nothing is installed) and times
``oom-protect --version``: the wrapper, the interpreter and the import of
oomguard.protect, which is the client's whole start-up; asking the broker
needs CAP_SYS_RESOURCE or a daemon and is bench_protect.py's part. The
wrapper runs on ``python3 -I``, which ignores PYTHONPATH, so the unpacked
tree goes onto sys.path in a ``-c`` prologue that then runs the wrapper's
own code. Commands are interleaved run by run; prints each median and the
ratios, plus the .deb's size and its installed size.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = "/usr/bin/python3"
DIST = "usr/lib/python3/dist-packages"


def time_once(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def packaged_client(root: Path) -> list[str]:
    wrapper = root / "usr/bin/oom-protect"
    boot = (f"import sys; sys.path.insert(0, {str(root / DIST)!r}); sys.argv[0] = {str(wrapper)!r}; "
            "exec(compile(open(sys.argv[0]).read(), sys.argv[0], 'exec'))")
    return [SYSTEM_PYTHON, "-I", "-c", boot, "--version"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deb", type=Path, default=None, help="default: the newest dist/oomguard_*.deb")
    p.add_argument("--runs", type=int, default=30)
    args = p.parse_args()
    deb = args.deb or max((REPO / "dist").glob("oomguard_*.deb"), key=lambda f: f.stat().st_mtime)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        commands = {
            "packaged oom-protect --version": packaged_client(root),
            "/usr/bin/python3 -I -c pass": [SYSTEM_PYTHON, "-I", "-c", "pass"],
            "venv oom-protect --version": [str(Path(sys.executable).with_name("oom-protect")), "--version"],
            f"{sys.executable} -I -c pass": [sys.executable, "-I", "-c", "pass"],
        }
        for argv in commands.values():  # warm the page cache
            time_once(argv)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, argv in commands.items():
                times[name].append(time_once(argv))
    medians = {name: statistics.median(t) for name, t in times.items()}
    installed = subprocess.run(["dpkg-deb", "-f", str(deb), "Installed-Size"], capture_output=True,
                               text=True, check=True).stdout.strip()
    depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True,
                             text=True, check=True).stdout.strip()
    print(f"{deb.name}: {deb.stat().st_size} bytes, installed {installed} KiB, depends: {depends}")
    print(f"median of {args.runs} runs each:")
    for name, m in medians.items():
        print(f"  {m * 1000:7.1f} ms  {name}")
    names = list(commands)
    print(f"packaged client / system python3 -I: {medians[names[0]] / medians[names[1]]:.2f}")
    print(f"venv client / its python3 -I:        {medians[names[2]] / medians[names[3]]:.2f}")
    print(f"packaged client / venv client:       {medians[names[0]] / medians[names[2]]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
