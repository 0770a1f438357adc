"""The real shop stack (shop.py) in the guest, inside a memory-limited cgroup."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

from shop import Shop  # tests/guest is on sys.path (conftest)

LIMIT = 384 << 20


def cgroup_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text().strip()


def rss_anon(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^RssAnon:\s+(\d+) kB", status, re.M).group(1)) << 10


def test_shop_runs_inside_a_memory_limited_cgroup(cgroup, guest_results_dir):
    cgroup.write("memory.max", LIMIT)
    inside = f"0::/{cgroup.path.name}"
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="oomguard-shop-"))  # pytest's tmp dirs are 0700
    shop = Shop(base, cgroup=cgroup.path, max_children=4)
    t0 = time.monotonic()
    shop.start(timeout=180)
    started = time.monotonic() - t0
    timings = {k: round(v, 2) for k, v in shop.timings.items()}
    print(f"\nshop start in the guest: {started:.1f} s {timings}")
    (guest_results_dir / "shop-start.json").write_text(json.dumps(timings) + "\n")
    try:
        assert shop.healthy(timeout=10)
        pids = shop.pids()
        services = [p for group in pids.values() for p in group]
        assert len(pids["mariadbd"]) == len(pids["php-fpm"]) == len(pids["nginx"]) == 1
        assert len(pids["php-fpm-workers"]) == 4 and len(pids["nginx-workers"]) == 1
        # started inside, so they and their charges are there, and nothing else is
        assert sorted(cgroup.pids()) == sorted(services)
        assert all(cgroup_of(p) == inside for p in services)
        anon = cgroup.stat("memory.stat")["anon"]
        assert anon >= rss_anon(pids["mariadbd"][0]) > 16 << 20, (anon, rss_anon(pids["mariadbd"][0]))
        current = int(cgroup.read("memory.current"))
        print(f"memory.current {current >> 20} MiB, anon {anon >> 20} MiB, "
              f"mariadbd RssAnon {rss_anon(pids['mariadbd'][0]) >> 20} MiB")
        assert current < LIMIT
        assert cgroup.stat("memory.events")["oom_kill"] == 0

        # a restart from outside the cgroup (like a healer's) lands inside it again
        t1 = time.monotonic()
        subprocess.run(shop.restart_argv("php-fpm"), check=True, timeout=120)
        print(f"php-fpm restart via restart_argv: {time.monotonic() - t1:.1f} s")
        after = shop.pids()
        assert after["php-fpm"] != pids["php-fpm"] and len(after["php-fpm-workers"]) == 4
        assert all(cgroup_of(p) == inside for p in after["php-fpm"] + after["php-fpm-workers"])
        assert shop.healthy(timeout=10)
    finally:
        t2 = time.monotonic()
        shop.stop()
        print(f"shop stop: {time.monotonic() - t2:.1f} s")
    assert cgroup.pids() == []
    assert not shop.healthy()
