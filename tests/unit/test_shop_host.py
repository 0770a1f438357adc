"""The real shop stack (tests/guest/shop.py) on this host, as root, no cgroup."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.guest import shop as shop_mod  # noqa: E402
from tests.guest.shop import MARKER, Shop, ShopError  # noqa: E402

NEEDED = [shop_mod.NGINX, shop_mod.MARIADBD, shop_mod.SQL_DIR / "mysql_system_tables.sql", "/usr/bin/mariadb"]
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not all(map(os.path.exists, NEEDED)) or not shutil.which(shop_mod.PHP_FPM),
                       reason="nginx, php-fpm8.2 and mariadb-server are not installed"),
]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def base():
    # not pytest's tmp_path: its parents are 0700, and www-data/mysql must get through
    with tempfile.TemporaryDirectory(prefix="oomguard-shop-") as d:
        yield Path(d)


def get(url_port: int) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", url_port, timeout=5)
    try:
        conn.request("GET", "/index.php")
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def sql(shop: Shop, statement: str) -> str:
    return subprocess.run(
        ["/usr/bin/mariadb", "--no-defaults", f"--socket={shop.base}/mysql/mariadbd.sock",
         "-uroot", "-N", "-e", statement],
        check=True, capture_output=True, text=True, timeout=30).stdout.strip()


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def user_of(pid: int) -> str:
    import pwd
    return pwd.getpwuid(int(status_of(pid)["Uid"].split()[0])).pw_name


def alive(pid: int) -> bool:
    try:
        return status_of(pid)["State"][0] != "Z"
    except FileNotFoundError:
        return False


def all_pids(pids: dict[str, list[int]]) -> set[int]:
    return {p for group in pids.values() for p in group}


INHERITED = 317  # an oom_score_adj nobody else would choose


@pytest.fixture
def raised_score_adj():
    """This process at INHERITED while the shop starts (raising needs no
    capability; going back down to where it was needs none either)."""
    original = Path("/proc/self/oom_score_adj").read_text().strip()
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(INHERITED))
    try:
        yield
    finally:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(original)


def test_shop_serves_from_mariadb_restarts_php_fpm_and_stops_clean(base, raised_score_adj):
    port, db_port, fpm_port = free_ports(3)
    shop = Shop(base, port=port, db_port=db_port, fpm_port=fpm_port, max_children=3)
    t0 = time.monotonic()
    shop.start(timeout=60)
    seen: set[int] = set()
    try:
        print(f"\nshop start on the host: {time.monotonic() - t0:.2f} s")

        # the page prints the marker and the value it read from MariaDB ...
        assert shop.healthy()
        status, body = get(port)
        assert status == 200
        assert body.strip() == f"{MARKER} {shop.token}"
        assert shop.token not in (base / "www/index.php").read_text()
        # ... live: change the row and the page follows
        sql(shop, "UPDATE shop.marker SET value = 'changed-in-db' WHERE id = 1")
        assert get(port) == (200, f"{MARKER} changed-in-db\n")
        assert not shop.healthy()
        sql(shop, f"UPDATE shop.marker SET value = '{shop.token}' WHERE id = 1")
        assert shop.healthy()

        before = shop.pids()
        seen |= all_pids(before)
        # starting it again fails before touching anything: the shop keeps running
        with pytest.raises(ShopError, match="already in use"):
            Shop(base, port=port, db_port=db_port, fpm_port=fpm_port).start()
        assert shop.pids() == before and shop.healthy()
        assert len(before["mariadbd"]) == len(before["php-fpm"]) == len(before["nginx"]) == 1
        assert len(before["php-fpm-workers"]) == 3  # pm = static, max_children = 3
        assert len(before["nginx-workers"]) == 1
        assert user_of(before["mariadbd"][0]) == "mysql"
        assert user_of(before["php-fpm"][0]) == user_of(before["nginx"][0]) == "root"
        for pid in before["php-fpm-workers"] + before["nginx-workers"]:
            assert user_of(pid) == "www-data"
        # Started from a caller at INHERITED, each service reset its own value
        # (to 0) before exec. Compared with the inherited value, not with 0,
        # because an oomguard daemon already running on this machine may
        # enforce its own policy on mariadbd and www-data at any moment.
        for pid in all_pids(before):
            assert Path(f"/proc/{pid}/oom_score_adj").read_text().strip() != str(INHERITED)
        for log in ("mariadbd.err", "php-fpm.log", "nginx-access.log"):
            assert (base / "log" / log).stat().st_size > 0, log

        # a healer-style restart: a plain argv, run in another process
        argv = shop.restart_argv("php-fpm")
        assert argv[0] == sys.executable and "php-fpm" in argv and str(base) in argv
        t1 = time.monotonic()
        subprocess.run(argv, check=True, timeout=60)
        print(f"php-fpm restart via restart_argv: {time.monotonic() - t1:.2f} s")
        after = shop.pids()
        seen |= all_pids(after)
        assert after["php-fpm"] and after["php-fpm"] != before["php-fpm"]
        assert len(after["php-fpm-workers"]) == 3
        assert not set(after["php-fpm-workers"]) & set(before["php-fpm-workers"])
        assert not any(alive(p) for p in before["php-fpm"] + before["php-fpm-workers"])
        assert after["mariadbd"] == before["mariadbd"] and after["nginx"] == before["nginx"]
        assert shop.healthy()
    finally:
        seen |= all_pids(shop.pids())
        t2 = time.monotonic()
        shop.stop()
        print(f"shop stop: {time.monotonic() - t2:.2f} s")

    assert not [p for p in seen if alive(p)]
    assert shop.pids() == {"mariadbd": [], "php-fpm": [], "php-fpm-workers": [],
                           "nginx": [], "nginx-workers": []}
    for p in (port, db_port, fpm_port):  # nothing listens any more
        assert not shop_mod._listen_inodes(p)
    assert not shop.healthy()


def test_restart_cleans_up_orphaned_workers_after_master_is_killed(base):
    port, db_port, fpm_port = free_ports(3)
    shop = Shop(base, port=port, db_port=db_port, fpm_port=fpm_port, max_children=2)
    shop.start(timeout=60)
    try:
        old = shop.pids()
        os.kill(old["php-fpm"][0], 9)  # what the OOM killer does to a master
        deadline = time.monotonic() + 5
        while shop.pids()["php-fpm"] and time.monotonic() < deadline:
            time.sleep(0.05)
        orphans = shop.pids()
        assert orphans["php-fpm"] == []
        assert orphans["php-fpm-workers"] == old["php-fpm-workers"]  # still hold the port
        subprocess.run(shop.restart_argv("php-fpm"), check=True, timeout=60)
        new = shop.pids()
        assert new["php-fpm"] and len(new["php-fpm-workers"]) == 2
        assert not any(alive(p) for p in old["php-fpm-workers"])
        assert shop.healthy()
    finally:
        shop.stop()
    assert not any(alive(p) for p in all_pids(old) | all_pids(new))


def test_failed_start_raises_with_the_log_tail_and_leaves_nothing_running(base):
    port, db_port, fpm_port = free_ports(3)
    shop = Shop(base, port=port, db_port=db_port, fpm_port=fpm_port, max_children=0)
    with pytest.raises(ShopError) as err:
        shop.start(timeout=60)
    assert "php-fpm failed to start" in str(err.value)
    assert "max_children" in str(err.value)  # the tail of php-fpm's own log
    assert shop.pids() == {"mariadbd": [], "php-fpm": [], "php-fpm-workers": [],
                           "nginx": [], "nginx-workers": []}
    for p in (port, db_port, fpm_port):
        assert not shop_mod._listen_inodes(p)
