"""The daemon SIGKILLed again and again while runs start and end (issue 13):
after every restart it knows every protected run still alive, before it
serves; every run that ended has its run_end event and every run its grant
event, once; the event store stays intact and no temp file is left behind.
The kill points come from a seeded generator, so a failure replays."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import time
from pathlib import Path

from daemon_fixture import BIN, start_daemon, wait_for

OOM_PROTECT = str(BIN / "oom-protect")
SEED = 20261202
KILLS = 20


def serving(d) -> bool:
    return d.cli("runs", "--json", check=False).returncode == 0


def protected_of(uid: int, cgroup) -> set[int]:
    """Live processes of ``uid`` at -1000 inside the test's cgroup."""
    out = set()
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z" or os.stat(f"/proc/{p}").st_uid != uid:
                continue
            cg = Path(f"/proc/{p}/cgroup").read_text().strip().removeprefix("0::")
            if Path(f"/proc/{p}/oom_score_adj").read_text().strip() == "-1000" and \
                    cg.startswith("/" + str(cgroup.path.relative_to("/sys/fs/cgroup"))):  # fmt: skip
                out.add(int(p))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def test_killed_twenty_times_the_daemon_forgets_no_live_run_and_loses_no_event(tmp_path, unpriv_user, cgroup,
                                                                               guest_results_dir):
    rnd = random.Random(SEED)
    base = tmp_path / "d"
    d = start_daemon(base)
    first = d
    wait_for(lambda: serving(first), timeout=60)
    env = unpriv_user.env(OOMGUARD_SOCKET=d.socket)
    clients: list[subprocess.Popen] = []
    restarts = []
    seen_alive: set[int] = set()
    try:
        for kill in range(KILLS):
            # a burst of runs, long and short, the daemon killed somewhere in it
            burst = []
            for i in range(rnd.randint(2, 5)):
                # the first of a burst is long: runs must be alive across the kills, however slow the host
                cmd = ["sleep", "300"] if i == 0 or rnd.random() < 0.4 else ["sh", "-c", "exit 3"]
                burst.append(cgroup.popen(unpriv_user.argv([OOM_PROTECT, *cmd]), env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
                time.sleep(rnd.uniform(0, 0.4))
            if kill % 4 == 3:  # now and then, end some long runs as well
                for p in rnd.sample(clients, k=min(2, len(clients))):
                    p.kill()
            time.sleep(rnd.uniform(0.2, 2.5))  # a client needs ~1 s under TCG to ask: some asked, some are asking
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait()
            clients += burst
            # whatever was in flight settles: granted (-1000) or refused (125)
            wait_for(lambda ps=list(clients): all(p.poll() is not None or p.pid in protected_of(unpriv_user.uid, cgroup)
                                                  for p in ps), timeout=60)  # fmt: skip
            t0 = time.monotonic()
            d = start_daemon(base)
            wait_for(lambda d=d: serving(d), timeout=120)
            restarts.append(time.monotonic() - t0)
            alive = protected_of(unpriv_user.uid, cgroup)
            seen_alive |= alive
            active = {r["pid"]: r for r in d.runs(all=False)}
            missing = alive - set(active)
            assert not missing, (kill, missing, [ln for ln in d.log_text().splitlines()  # every incarnation's
                                                 if any(f"pid={p} " in ln or f"pid {p} " in ln for p in missing)
                                                 or "adopt" in ln or "refus" in ln or "cgroup" in ln])  # fmt: skip
            clients = [p for p in clients if p.poll() is None]
        for p in clients:
            p.kill()
            p.wait()
        wait_for(lambda: not d.runs(all=False), timeout=60)  # every run ended, seen by the daemon
        d.stop()
        assert len(seen_alive) >= 5, (seen_alive, d.log_text()[-3000:])  # runs were alive across kills
        assert (base / "state" / "runs.json").exists(), d.log_text()[-3000:]
        runs = json.loads((base / "state" / "runs.json").read_text())["runs"]
        db = sqlite3.connect(base / "state" / "events.db")
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        counts: dict[str, dict[int, int]] = {"grant": {}, "run_end": {}}
        for kind, data in db.execute("SELECT kind, data FROM events WHERE kind IN ('grant', 'run_end')"):
            rid = json.loads(data)["id"]
            counts[kind][rid] = counts[kind].get(rid, 0) + 1
        ids = {r["id"] for r in runs}
        assert ids and all(r["ended"] for r in runs)
        assert {i: counts["grant"].get(i, 0) for i in ids} == dict.fromkeys(ids, 1), counts["grant"]
        assert {i: counts["run_end"].get(i, 0) for i in ids} == dict.fromkeys(ids, 1), counts["run_end"]
        assert all(r["exit_status"] is not None or r["end_reason"] for r in runs), runs
        assert [p.name for p in (base / "state").iterdir() if p.name.endswith(".tmp")] == []
        figure = (f"{KILLS} kills, {len(ids)} runs, {len(seen_alive)} protected processes alive across kills;"
                  f" restart to serving: median {statistics.median(restarts):.2f} s, max {max(restarts):.2f} s\n")
        print(figure)
        if guest_results_dir.is_dir():
            (guest_results_dir / "crash-figures.txt").write_text(figure)
    finally:
        for p in clients:
            if p.poll() is None:
                p.kill()
        d.stop()


def test_a_restart_that_lost_runs_json_adopts_each_live_run_by_its_cgroup(tmp_path, unpriv_user, cgroup):
    """runs.json gone (a restore, a disk error): the run's cgroup and its
    -1000 processes are still there, and a restarted daemon knows the run
    again, by its id, before it serves; the run then ends as any other."""
    base = tmp_path / "d"
    d = start_daemon(base)
    p = cgroup.popen(unpriv_user.argv([OOM_PROTECT, "sleep", "300"]), env=unpriv_user.env(OOMGUARD_SOCKET=d.socket))
    try:
        run = wait_for(lambda: next((r for r in d.runs(all=False) if r["pid"] == p.pid), None), timeout=60)
        wait_for(lambda: Path(f"/proc/{p.pid}/comm").read_text().strip() == "sleep", timeout=60)
        d.proc.kill()
        d.proc.wait()
        (base / "state" / "runs.json").unlink()
        d = start_daemon(base)
        wait_for(lambda: serving(d), timeout=60)  # the old socket file outlived the SIGKILL
        again = next(r for r in d.runs(all=False))  # the first answer already knows it
        assert (again["id"], again["pid"], again["cgroup"], again["uid"]) == (run["id"], p.pid, run["cgroup"],
                                                                             unpriv_user.uid)  # fmt: skip
        assert again["command"] == "sleep 300" and again["ended"] is None
        grants = [e for e in d.cli_json("events", "--kind", "grant") if e["data"]["id"] == run["id"]]
        assert len(grants) == 1  # the first grant's event is still in the store: none added
        p.kill()
        assert p.wait(30) == -signal.SIGKILL
        ended = wait_for(lambda: next((r for r in d.runs() if r["id"] == run["id"] and r["ended"]), None), 60)
        assert ended["exit_status"] == -signal.SIGKILL and ended["end_reason"] == "exited"
        assert not Path("/sys/fs/cgroup" + run["cgroup"]).exists()
    finally:
        if p.poll() is None:
            p.kill()
        d.stop()
