"""Run one command as root in a throw-away guest.

    python3 -m tests.guest.harness [--mem MiB] [--timeout S] [--cpus N]
        [--results DIR] [--writable PATH]... [--env K=V]... [--systemd] -- CMD ARGS...
    python3 -m tests.guest.harness --fetch-kernel   # fetch/refresh the kernel, build the initramfs

Exits with CMD's exit status, or 125 if the guest itself failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .initramfs import build_initramfs
from .kernel import KernelError, ensure_kernel
from .vm import GUEST_FAILURE, GuestError, run_guest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m tests.guest.harness", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--mem", type=int, default=1024, metavar="MiB", help="guest memory (default 1024)"
    )
    parser.add_argument("--cpus", type=int, default=2, help="guest CPUs (default 2)")
    parser.add_argument(
        "--timeout", type=float, default=1200, metavar="S", help="hard time-out (default 1200)"
    )
    parser.add_argument(
        "--results", type=Path, metavar="DIR", help="host dir mounted at /results (default: temp)"
    )
    parser.add_argument(
        "--cwd", type=Path, help="working directory in the guest (default: repo root)"
    )
    parser.add_argument(
        "--writable", action="append", default=[], metavar="PATH", help="extra writable overlay"
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="extra environment variable"
    )
    parser.add_argument(
        "--systemd", action="store_true", help="boot systemd as PID 1, run CMD as a unit"
    )
    parser.add_argument(
        "--fetch-kernel", action="store_true", help="fetch/refresh the guest kernel and exit"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command

    if args.fetch_kernel:
        try:
            vmlinux = ensure_kernel(refresh=True)
            print(f"guest kernel: {vmlinux.resolve()}\ninitramfs:    {build_initramfs(vmlinux)}")
        except KernelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    if not command:
        parser.error("no command given (usage: ... -- CMD ARGS...)")

    env = dict(item.split("=", 1) for item in args.env)
    try:
        result = run_guest(
            command,
            timeout=args.timeout,
            memory_mib=args.mem,
            cpus=args.cpus,
            env=env,
            results_dir=args.results,
            stream=sys.stdout,
            cwd=args.cwd,
            writable=args.writable,
            flavour="systemd" if args.systemd else "plain",
        )
    except GuestError as exc:
        print(f"\noomguard guest failed: {exc}", file=sys.stderr)
        return GUEST_FAILURE
    print(
        f"\n[guest] exit status {result.returncode}; command started {result.boot_seconds:.1f} s after launch, "
        f"guest ran {result.total_seconds:.1f} s in all; results in {result.results_dir}",
        file=sys.stderr,
    )
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
