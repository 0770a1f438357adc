"""Bounded protection against the real kernel (issue 11): `oom-protect
--memory-max SIZE CMD` as a real user on a real terminal, in an app cgroup
that also holds the shop.

The layout is a shop's: an app cgroup with a limit, the shop's processes in
one child and the user's session in another. A budgeted run's cgroup goes
beside the session's, inside the app cgroup, so the app's limit still holds
it. At its budget the kernel cannot kill its -1000 tasks and the cgroup
livelocks; the daemon reads that from the kernel log and ends the run at
once. The shop is never touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from daemon_fixture import BIN, wait_for
from terminal import Terminal

PY = sys.executable
OOM_PROTECT = str(BIN / "oom-protect")
APP_LIMIT = 200 << 20
CG_ROOT = Path("/sys/fs/cgroup")


def shop_layout(cgroup, unpriv_user):
    """The app cgroup (limit, no swap) with the shop's child and the session's."""
    cgroup.write("memory.max", APP_LIMIT)
    cgroup.write("memory.swap.max", 0)
    shop, session = cgroup.child("shop"), cgroup.child("session")
    ready = Path(f"/tmp/budget-shop-{os.getpid()}")
    ready.unlink(missing_ok=True)
    code = textwrap.dedent(f"""
        import time
        data = bytearray(30 << 20)
        for i in range(0, len(data), 4096): data[i] = 1
        open("{ready}", "w").close()
        time.sleep(600)
    """)
    php = shop.popen(unpriv_user.argv([PY, "-c", code]), env=unpriv_user.env())
    wait_for(ready.exists, timeout=120)
    return shop, session, php


def eater(go: Path, megabytes: int) -> str:
    """Prints its cgroup and that cgroup's memory.max, waits for ``go``,
    then touches ``megabytes`` MiB one at a time."""
    return textwrap.dedent(f"""
        import os, time
        cg = open("/proc/self/cgroup").read().strip().removeprefix("0::")
        print("cgroup", cg, open("/sys/fs/cgroup" + cg + "/memory.max").read().strip(), flush=True)
        while not os.path.exists("{go}"): time.sleep(0.02)
        chunks = []
        for _ in range({megabytes}):
            chunk = bytearray(1 << 20)
            for i in range(0, len(chunk), 4096): chunk[i] = 1
            chunks.append(chunk)
        print("ate", len(chunks), flush=True)
    """)


def run_of(daemon, pid: int) -> dict | None:
    return next((r for r in daemon.runs() if r["pid"] == pid), None)


def test_a_run_over_its_budget_is_ended_at_once_and_the_shop_is_untouched(daemon, unpriv_user, cgroup, kmsg,
                                                                         guest_results_dir):
    shop, session, php = shop_layout(cgroup, unpriv_user)
    go = Path(f"/tmp/budget-go-{os.getpid()}")
    go.unlink(missing_ok=True)
    tty = Terminal(unpriv_user.uid)
    try:
        argv = session.argv(unpriv_user.argv([OOM_PROTECT, "--memory-max", "48M", PY, "-c", eater(go, 190)]))
        p = tty.popen(argv, env=unpriv_user.env(OOMGUARD_SOCKET=daemon.socket))
        run = wait_for(lambda: run_of(daemon, p.pid), timeout=60)
        _, own, limit = tty.wait_for(r"cgroup (\S+) (\d+)").group(0).split()
        app = "/" + str(cgroup.path.relative_to(CG_ROOT))
        assert own == run["cgroup"] == f"{app}/oomguard-run-{run['id']}"  # beside the session, in the app cgroup
        assert int(limit) == 48 << 20 and run["memory_max"] == 48 << 20
        assert (CG_ROOT / own.lstrip("/") / "memory.swap.max").read_text().strip() == "0"

        events = CG_ROOT / own.lstrip("/") / "memory.events"
        go.touch()
        hit = wait_for(lambda: _oom_count(events) and time.monotonic(), timeout=120, interval=0.01)
        status = p.wait(timeout=60)
        ended_after = time.monotonic() - hit
        assert status in (-signal.SIGTERM, -signal.SIGKILL), tty.text  # SIGTERM, SIGKILL 0.5 s later

        done = wait_for(lambda: (r := run_of(daemon, p.pid)) and r["ended"] and r, timeout=60)
        assert done["end_reason"] == "exceeded its 48M budget"
        assert "ate 190" not in tty.text
        # the owner is told on the run's terminal
        tty.wait_for(rf"oomguard: protected run {run['id']} \([^\n]*\) was stopped: run {run['id']} exceeded its "
                     r"48M budget")  # fmt: skip
        kmsg.wait_for(r"no killable processes")
        assert not (CG_ROOT / own.lstrip("/")).exists()  # the run's own cgroup is removed

        healer = [e for e in daemon.cli_json("events", "--kind", "healer") if e["data"].get("run") == run["id"]]
        assert healer and healer[-1]["data"]["action"] == "killed"
        assert healer[-1]["data"]["reason"] == f"run {run['id']} exceeded its 48M budget"
        ends = [e for e in daemon.cli_json("events", "--kind", "run_end") if e["data"]["id"] == run["id"]]
        assert [e["data"]["end_reason"] for e in ends] == ["exceeded its 48M budget"]

        # the shop in the same app cgroup: not starved, not killed
        assert php.poll() is None
        assert shop.stat("memory.events")["oom_kill"] == 0 and cgroup.stat("memory.events")["oom_kill"] == 0
        (guest_results_dir / "budget-figures.txt").write_text(
            f"budget 48M, need 190M: from the run's first memcg OOM to the run ended {ended_after:.2f} s\n"
        )
        print(f"budget hit to run ended: {ended_after:.2f} s")
        assert ended_after < 30  # "within seconds", with room for TCG
    finally:
        go.unlink(missing_ok=True)
        tty.close()
        php.kill()


def _oom_count(events: Path) -> int:
    try:
        return dict(line.split() for line in events.read_text().splitlines()).get("oom", "0") != "0"
    except OSError:
        return False


def test_a_run_within_its_budget_completes_and_a_budget_above_the_callers_limit_is_clamped(daemon, unpriv_user,
                                                                                          cgroup):
    shop, session, php = shop_layout(cgroup, unpriv_user)
    go = Path(f"/tmp/budget-go-{os.getpid()}")
    go.touch()
    try:
        r = subprocess.run(
            session.argv(unpriv_user.argv([OOM_PROTECT, "--memory-max", "1G", PY, "-c", eater(go, 40)])),
            env=unpriv_user.env(OOMGUARD_SOCKET=daemon.socket), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        _, own, limit = r.stdout.splitlines()[0].split()
        assert int(limit) == APP_LIMIT  # 1G asked, clamped to the app cgroup's 200M
        assert r.stdout.splitlines()[1] == "ate 40"
        done = wait_for(lambda: next((x for x in daemon.runs() if x["cgroup"] == own and x["ended"]), None), 60)
        assert done["end_reason"] == "exited" and done["exit_status"] == 0 and done["memory_max"] == APP_LIMIT
        assert php.poll() is None
    finally:
        go.unlink(missing_ok=True)
        php.kill()


def test_a_bad_budget_is_refused_with_125_and_nothing_runs(daemon, unpriv_user):
    marker = Path(f"/tmp/budget-ran-{os.getpid()}")
    r = unpriv_user.run([OOM_PROTECT, "--memory-max", "lots", "touch", str(marker)],
                        env=unpriv_user.env(OOMGUARD_SOCKET=daemon.socket))  # fmt: skip
    assert r.returncode == 125 and "'lots' is not a size like 512M or 2G" in r.stderr
    assert not marker.exists()
