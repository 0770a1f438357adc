"""The real shop as the packaged Debian units, for the flagship scenario under systemd.

nginx.service, php8.2-fpm.service and mariadb.service run as Debian ships
them; the shop is only configuration in the guest's writable /etc (and a web
root in /srv), written by ``UnitShop.write_files`` and
``write_healer_dropin`` and removed by ``UnitShop.remove_files``:

- an nginx site on 127.0.0.1:PORT whose index.php goes to a php-fpm pool of
  its own (127.0.0.1:FPM_PORT, ``pm = static``, 4 workers, as in the plain
  guest's shop; Debian's ``www`` pool stays as it is);
- index.php reads a token from a table in the packaged MariaDB (127.0.0.1,
  the packaged datadir), which ``create_database`` makes with the mariadb
  client over root's unix socket and ``drop_database`` removes again;
- a config drop-in for the daemon ``oomguard setup`` installs: the healer
  watches the page, with a short grace, no time-of-day window, and restarts
  the units with ``systemctl restart UNIT`` (an argv, no shell).

``UnitShop`` has what flagship.py's scenario reads of tests/guest/shop.Shop
(``port``, ``expected_body``, ``healthy()``, ``pids()``), taken from the
units' MainPID and cgroups instead of pid files.
"""

from __future__ import annotations

import errno
import os
import secrets
import select
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flagship import (
    CASE_TIMEOUT,
    CHUNK,
    IMPORT_PY,
    OOM_PROTECT,
    PY,
    CaseResult,
    CaseWatch,
    Flagship,
    KmsgFollower,
    Prober,
    Timeline,
    _one,
    alive,
    flat_keyed,
    read_adj,
    tick_sample,
)
from shop import answers
from systemd_tools import cgroup_of, run, systemctl, wait_until

from oomguard.cli.client import DEFAULT_SOCKET, DaemonError, request
from oomguard.host.scope import scope_argv

APP_SLICE = "oomguard-app.slice"
APP_CGROUP = "/oomguard.slice/oomguard-app.slice"  # dashes nest in slice names
UNITS = {"nginx": "nginx.service", "php-fpm": "php8.2-fpm.service", "mariadbd": "mariadb.service"}
SERVICES = tuple(UNITS.values())
COMM = {"mariadbd": "mariadbd", "php-fpm": "php-fpm8.2", "nginx": "nginx"}

NAME = "oomguard-flagship"
PORT, FPM_PORT = 8480, 9010
WEB_ROOT = Path("/srv") / NAME
NGINX_SITE = Path("/etc/nginx/sites-enabled") / f"{NAME}.conf"
FPM_POOL = Path("/etc/php/8.2/fpm/pool.d") / f"{NAME}.conf"
OOMGUARD_DROPIN = Path("/etc/oomguard/oomguard.toml.d") / f"90-{NAME}.toml"
DB, DB_USER = "oomguard_flagship", "oomguard_flagship"

MARKER = "OOMGUARD-SHOP-OK"

NGINX_SITE_TEXT = f"""# {NAME}: the flagship scenario's shop (tests/systemd/shop_units.py)
server {{
    listen 127.0.0.1:{PORT};
    root {WEB_ROOT};
    index index.php;
    access_log off;
    location ~ \\.php$ {{
        include fastcgi_params;
        fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
        fastcgi_pass 127.0.0.1:{FPM_PORT};
    }}
}}
"""

FPM_POOL_TEXT = f"""; {NAME}: the flagship scenario's shop (tests/systemd/shop_units.py)
[{NAME}]
user = www-data
group = www-data
listen = 127.0.0.1:{FPM_PORT}
pm = static
pm.max_children = 4
"""

INDEX_PHP = """<?php
header('Content-Type: text/plain');
$db = new PDO('mysql:host=127.0.0.1;port=3306;dbname={db}', '{user}', '{password}',
              [PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION, PDO::ATTR_TIMEOUT => 5]);
echo '{marker} ', $db->query('SELECT value FROM marker WHERE id = 1')->fetchColumn(), "\\n";
"""


def healer_dropin(grace: float, term_timeout: float) -> str:
    """The daemon's config drop-in: the healer part of the plain flagship's
    config, with the units restarted through systemd."""
    services = "".join(
        f'[[healer.service]]\nname = "{unit}"\nrestart = "systemctl restart {unit}"\n'
        for unit in (UNITS["php-fpm"], UNITS["nginx"])
    )
    return f"""# {NAME}: the flagship scenario (tests/systemd/shop_units.py)
[healer]
grace = "{grace:g}s"
timezone = "UTC"
window = []
term_timeout = "{term_timeout:g}s"
restart_backoff = "3s"
restart_tries = 4
[[healer.check]]
name = "shop"
http = "http://127.0.0.1:{PORT}/index.php"
interval = "1s"
timeout = "2s"
failures = 2
{services}"""


def unit_procs(unit: str) -> list[int]:
    """Live processes of a unit in the app slice (none if it is stopped)."""
    try:
        pids = Path(f"/sys/fs/cgroup{APP_CGROUP}/{unit}/cgroup.procs").read_text().split()
    except OSError:
        return []
    return sorted(int(p) for p in pids if alive(int(p)))


class UnitShop:
    """The shop of the packaged units: what the flagship scenario looks at."""

    port = PORT
    url = f"http://127.0.0.1:{PORT}/index.php"

    def __init__(self) -> None:
        self.token = secrets.token_hex(8)
        self.password = secrets.token_hex(8)
        self._written: list[Path] = []  # files, then the directories we made for them

    @property
    def expected_body(self) -> str:
        return f"{MARKER} {self.token}"

    # ---- configuration

    def _write(self, path: Path, text: str, mode: int = 0o644) -> None:
        missing = []
        d = path.parent
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            d.mkdir(mode=0o755)
            self._written.append(d)
        assert not path.exists(), f"{path} is there already: another test left it behind"
        path.write_text(text)
        path.chmod(mode)
        self._written.append(path)

    def write_files(self) -> None:
        """The shop's files, before its units start."""
        self._write(NGINX_SITE, NGINX_SITE_TEXT)
        self._write(FPM_POOL, FPM_POOL_TEXT)
        page = INDEX_PHP.format(db=DB, user=DB_USER, password=self.password, marker=MARKER)
        self._write(WEB_ROOT / "index.php", page)

    def write_healer_dropin(self, grace: float, term_timeout: float) -> None:
        """The daemon's healer config; written once the shop answers (then
        `systemctl reload oomguard.service`), so that the healer does not
        restart units that are still starting."""
        self._write(OOMGUARD_DROPIN, healer_dropin(grace, term_timeout))

    def remove_files(self) -> None:
        for p in reversed(self._written):
            if p.is_dir():
                p.rmdir()
            else:
                p.unlink(missing_ok=True)
        self._written.clear()

    def create_database(self) -> None:
        """The shop's table and a user that may only read it (root's unix socket)."""
        sql = f"""CREATE DATABASE {DB};
CREATE TABLE {DB}.marker (id INT PRIMARY KEY, value VARCHAR(64) NOT NULL) ENGINE=InnoDB;
INSERT INTO {DB}.marker VALUES (1, '{self.token}');
CREATE USER '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{self.password}';
GRANT SELECT ON {DB}.* TO '{DB_USER}'@'127.0.0.1';
"""
        run(["mariadb", "--batch"], input=sql, timeout=120)

    def drop_database(self) -> None:
        run(["mariadb", "--batch"], input=f"DROP USER IF EXISTS '{DB_USER}'@'127.0.0.1';\n"
            f"DROP DATABASE IF EXISTS {DB};\n", timeout=120, check=False)  # fmt: skip

    # ---- looking at it

    def healthy(self, timeout: float = 2) -> bool:
        return answers(self.port, self.expected_body, timeout)

    def pids(self) -> dict[str, list[int]]:
        """As Shop.pids(): the masters ("mariadbd", "php-fpm", "nginx": [] or
        [MainPID]) and the other live processes of the units ("php-fpm-workers",
        "nginx-workers")."""
        state = units_state()
        out: dict[str, list[int]] = {}
        for name, unit in UNITS.items():
            procs = unit_procs(unit)
            main = int(state[unit]["MainPID"] or 0)
            out[name] = [main] if main and main in procs else []
            if name != "mariadbd":
                out[f"{name}-workers"] = [p for p in procs if p != main]
        return out


def memory_current(cgroup: str = APP_CGROUP) -> int:
    return int(Path(f"/sys/fs/cgroup{cgroup}/memory.current").read_text())


def memory_stat(cgroup: str = APP_CGROUP) -> dict[str, int]:
    text = Path(f"/sys/fs/cgroup{cgroup}/memory.stat").read_text()
    return {k: int(v) for k, v in (line.split() for line in text.splitlines())}


def reclaim_page_cache(cgroup: str = APP_CGROUP) -> None:
    """Have the kernel reclaim the cgroup's page cache now (memory.reclaim).

    Much of what the slice holds is clean cache of files read over 9p
    (binaries, libraries, MariaDB's system tables). Left there, an import at
    the limit first spends tens of seconds (on a busy TCG host) evicting and
    refaulting it, the shop stalled all along, before the OOM killer acts;
    the plain guest's shop keeps little cache. What is left is the shop's
    working set, which the next requests fault back in."""
    st = memory_stat(cgroup)
    try:
        Path(f"/sys/fs/cgroup{cgroup}/memory.reclaim").write_text(
            str(max(st["file"] - st["shmem"], 1 << 20))
        )
    except OSError as e:
        if e.errno != errno.EAGAIN:  # it reclaimed less than asked: all it could
            raise


# =============================================================================
# the units' state, one systemctl call for all three

UNIT_PROPS = ("ActiveState", "SubState", "Result", "MainPID", "InvocationID", "NRestarts",
              "ExecMainStartTimestampMonotonic")  # fmt: skip


def units_state(units: tuple[str, ...] = SERVICES) -> dict[str, dict[str, str]]:
    out = run(["systemctl", "show", "-p", ",".join(UNIT_PROPS), *units]).stdout
    blocks = [b for b in out.strip().split("\n\n")]
    assert len(blocks) == len(units), out
    return {unit: dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            for unit, block in zip(units, blocks, strict=True)}  # fmt: skip


# =============================================================================
# the scenario on the units



def ask(op: str, **fields) -> dict:
    """A request to oomguard.service's socket (root: every op)."""
    return request(op, DEFAULT_SOCKET, timeout=20, **fields)


@dataclass
class UnitCaseResult(CaseResult):
    units_before: dict = field(default_factory=dict)  # units_state() before the case
    units_after: dict = field(default_factory=dict)
    mariadb_oom_kills: tuple[int, int] = (
        0,
        0,
    )  # mariadb.service's memory.events oom_kill, before/after
    import_scope: str = ""  # the transient scope root moved the login shell into
    login_status: int | None = None  # runuser's exit status
    t0_monotonic: float = 0.0  # the timeline's zero, on CLOCK_MONOTONIC (systemd's *Monotonic)


class UnitFlagship(Flagship):
    """flagship.Flagship's scenario on the units: the app slice with a tight
    MemoryMax=, the shop's units in it, the daemon of ``oomguard setup``
    (oomguard.service) with the healer drop-in. Set-up and clean-up are the
    caller's (test_flagship_systemd.py's fixture); this plays the cases."""

    def __init__(self, shop: UnitShop, user, *, limit: int, grace: float):
        self.shop = shop  # type: ignore[assignment]
        self.user = user
        self.limit, self.grace = limit, grace
        self.app_cgroup = APP_CGROUP
        self.app_dir = Path(f"/sys/fs/cgroup{APP_CGROUP}")
        self.echo = None

    def ask(self, op: str, **fields) -> dict:
        return ask(op, **fields)

    def events_cli(self, since: float) -> list[dict]:
        """The daemon's events since ``since`` (the data of `oomguard events
        --json`, asked of the socket: the CLI's start costs seconds under TCG)."""
        return [e for e in ask("events", since=since, limit=100000)["events"] if e["ts"] >= since]

    def ready(self, timeout: float = 120) -> None:
        """The shop answers, MariaDB is at -1000, every php-fpm worker has its
        class value, and the healer is watching with no incident open."""
        deadline = time.monotonic() + timeout
        reclaim_page_cache()
        self.wait_ready(deadline)

    def shop_ready(self, pids: dict[str, list[int]]) -> bool:
        return len(pids["php-fpm-workers"]) >= 4 and all(read_adj(p) == 200 for p in pids["php-fpm-workers"])

    def login(self, mode: str, scope_name: str) -> tuple[subprocess.Popen, int]:
        """shopuser logs in (runuser -l: PAM, pam_systemd, a logind session in
        user-UID.slice); its shell says its pid and waits. Root moves that
        shell into a scope of the app slice, so that the import is charged
        where the shop is; the shell then execs oom-protect (same pid)."""
        cmd = shlex.join(
            [OOM_PROTECT, PY, "-I", "-S", "-c", IMPORT_PY, mode, str(self.app_dir), str(CHUNK)]
        )
        proc = subprocess.Popen(["runuser", "-l", self.user.name, "-c", f"echo $$; read go; exec {cmd}"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)  # fmt: skip
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        if not line.strip().isdigit():
            proc.kill()
            raise AssertionError(
                f"the login shell said {line!r} (status {proc.poll()}), not its pid"
            )
        pid = int(line)
        session = cgroup_of(pid)
        assert session.startswith(f"/user.slice/user-{self.user.uid}.slice/session-"), session
        run(scope_argv(scope_name, pid, APP_SLICE, f"oomguard flagship: {self.user.name}'s import"))
        wait_until(
            lambda: cgroup_of(pid) == f"{APP_CGROUP}/{scope_name}",
            f"the login shell in {scope_name}",
        )
        return proc, pid

    # ---------------------------------------------------------------- a case

    def run_case(self, case: str) -> UnitCaseResult:  # noqa: C901 (flagship.run_case, on units)
        mode = {"A": "finish", "B": "stall"}[case]
        title = {
            "A": "Case A: the import finishes within the grace",
            "B": "Case B: the import stalls past the grace",
        }[case]
        self.ready()
        shop = self.shop
        scope_name = f"oomguard-flagship-import-{case.lower()}-{os.getpid()}.scope"
        login, import_pid = self.login(mode, scope_name)
        tl = Timeline(self.echo)
        res = UnitCaseResult(case, title, tl.steps, self.app_cgroup, self.limit, self.grace)
        res.import_pid, res.import_scope, res.t0_monotonic = import_pid, scope_name, tl.t0
        pids0 = shop.pids()
        db = pids0["mariadbd"][0]
        res.mariadb_pid_before, res.mariadb_adj = db, read_adj(db)
        res.units_before = units_state()
        db_events = self.app_dir / UNITS["mariadbd"] / "memory.events"
        db_kills0 = flat_keyed(db_events).get("oom_kill", 0)
        res.memory_events_before = flat_keyed(self.app_dir / "memory.events")
        cur = int((self.app_dir / "memory.current").read_text())
        tl.add(f"the shop answers; {APP_SLICE} uses {cur >> 20} of {self.limit >> 20} MiB")
        tl.add(f"MariaDB pid {db} (oom_score_adj {res.mariadb_adj}); php-fpm master "
               f"{_one(pids0['php-fpm'])} + {len(pids0['php-fpm-workers'])} processes; nginx master "
               f"{_one(pids0['nginx'])} + {len(pids0['nginx-workers'])} workers")  # fmt: skip
        what = (
            "needs what the killable processes hold, then finishes"
            if mode == "finish"
            else "wants more than exists; ignores SIGTERM"
        )
        tl.add(f"{self.user.name} (logged in, shell moved into {scope_name}) runs: "
               f"oom-protect python3 import.py   ({what})")  # fmt: skip

        kmsg = KmsgFollower()
        prober = Prober(shop)  # type: ignore[arg-type]
        prober.start()
        sampler = MemoryEventsSampler(self.app_dir / "memory.events")
        sampler.start()
        since = tl.wall0
        # the import is the login shell's pid (runuser's child): its end is
        # when its pidfd turns readable, watched in a thread of its own
        import_gone: list[float] = []
        pidfd = os.pidfd_open(import_pid)

        def watch_import() -> None:
            select.select([pidfd], [], [])
            import_gone.append(time.monotonic())

        threading.Thread(target=watch_import, daemon=True, name="flagship-import-pidfd").start()
        status = StatusSampler(self.healer_status, tl.t0)
        status.start()
        assert login.stdin is not None
        login.stdin.write("go\n")
        login.stdin.flush()

        def victim(t: float, pid: int, comm: str, uid: int | None, adj: int | None, anon_kb: int,
                   source: str) -> None:  # fmt: skip
            if any(v["pid"] == pid for v in res.victims):
                return
            res.victims.append({"t": round(t, 2), "pid": pid, "comm": comm, "uid": uid, "oom_score_adj": adj,
                                "anon_rss_kb": anon_kb, "seen_in": source})  # fmt: skip
            imp = (
                "the import has already ended"
                if import_gone
                else f"import (pid {import_pid}) keeps going"
            )
            tl.at(t, f"kernel OOM-killed {comm} (pid {pid}, oom_score_adj {adj}); {imp}", "kernel")

        watch = CaseWatch(tl, prober, kmsg, res, victim)
        reader = watch.follow_output(login)
        unit_prev = {u: (s["ActiveState"], s["MainPID"]) for u, s in res.units_before.items()}
        next_slow = 0.0
        deadline = time.monotonic() + CASE_TIMEOUT
        while time.monotonic() < deadline:
            now = time.monotonic()
            watch.output()
            if import_gone and not any(st.source == "import-exit" for st in tl.steps):
                tl.at(import_gone[0] - tl.t0, f"import (pid {import_pid}) gone", "import-exit")
            watch.probes()
            watch.kernel()
            if now >= next_slow:
                next_slow = now + 0.5
                # systemd's view of the units: stopped after an OOM kill, started again
                for unit, s in units_state().items():
                    cur_state = (s["ActiveState"], s["MainPID"])
                    if cur_state != unit_prev[unit]:
                        unit_prev[unit] = cur_state
                        result = f", result {s['Result']}" if s["Result"] != "success" else ""
                        tl.add(f"systemd: {unit} {s['ActiveState']} ({s['SubState']}{result}), "
                               f"MainPID {s['MainPID']}", "systemd")  # fmt: skip
                try:
                    rows = self.ask("events", since=since, limit=100000)["events"]
                except DaemonError as e:
                    rows = []
                    tl.add(f"(cannot reach the daemon: {e})", "oomguard")
                watch.daemon_events(rows, import_pid)
            if watch.recovered and import_gone and watch.up_again_at is not None:
                res.finished = True
                break
            time.sleep(0.1)

        # ---- after the case
        prober.stop.set()
        prober.join(5)
        sampler.stop.set()
        sampler.join(5)
        status.stop.set()
        status.join(30)
        res.tick_samples = status.samples
        kmsg.close()
        if (ll := livelock_from(sampler.samples)) is not None:
            res.livelock_seen = {**ll, "t": round(ll["t"] - tl.t0, 2)}
            tl.at(ll["t"] - tl.t0, f"memory.events: oom +{ll['oom_per_second']}/s, oom_kill stuck at "
                                   f"{ll['oom_kill']}: only -1000 tasks left, the import spins", "cgroup")  # fmt: skip
        if not import_gone:  # the time-out: leave nothing behind for the next case
            systemctl("kill", "--signal=SIGKILL", "oomguard-run-*.scope", scope_name, check=False)
            wait_until(lambda: import_gone, "the import's end after SIGKILL", timeout=60)
        os.close(pidfd)  # its watcher has returned
        reader.join(60)
        res.login_status = login.poll()
        res.import_output = [line for _, line in watch.out_lines]

        # the run's end is recorded by the daemon's reaper; a restart try's
        # event once its commands return (can be just after the first healthy probe)
        def settled() -> list[dict] | None:
            runs = [r for r in self.ask("runs", all=True)["runs"] if r["pid"] == import_pid]
            restarted = any(e["data"].get("action") == "restart" for e in
                            self.ask("events", since=since, kinds=["healer"], limit=1000)["events"])  # fmt: skip
            return (
                runs
                if runs and runs[-1].get("end_reason") and (restarted or not res.finished)
                else None
            )

        runs = wait_until(settled, "the run's end and the restart event on record", timeout=60)
        res.run = runs[-1]
        res.import_status = _status(res.run.get("exit_status"), res.run.get("end_reason"))
        res.events = self.events_cli(since)
        res.healer_status = self.healer_status()
        res.memory_events_after = flat_keyed(self.app_dir / "memory.events")
        res.units_after = units_state()
        res.mariadb_oom_kills = (db_kills0, flat_keyed(db_events).get("oom_kill", 0))
        pids1 = shop.pids()
        res.mariadb_pid_after = pids1["mariadbd"][0] if pids1["mariadbd"] else None
        res.mariadb_alive = alive(db)
        res.healthy_at_end = shop.healthy(timeout=5)
        res.figures = self.figures(
            res, tl, watch.down_at, watch.up_again_at, import_gone[0] - tl.t0 if import_gone else None
        )
        res.figures["limit_mib"] = self.limit >> 20
        tl.flush(force=True)
        res.steps = tl.sorted()
        return res


class MemoryEventsSampler(threading.Thread):
    """The app slice's memory.events every ``interval`` seconds, in a thread
    of its own: while the slice livelocks, the watch loop's systemctl and
    daemon calls can stall for many seconds (17 s seen), which would hide
    the livelock from a sampler in that loop."""

    def __init__(self, path: Path, interval: float = 0.5):
        super().__init__(daemon=True, name="flagship-memory-events")
        self.path, self.interval = path, interval
        self.stop = threading.Event()
        self.samples: list[tuple[float, int, int]] = []  # (monotonic, oom, oom_kill)

    def run(self) -> None:
        while not self.stop.is_set():
            ev = flat_keyed(self.path)
            self.samples.append((time.monotonic(), ev.get("oom", 0), ev.get("oom_kill", 0)))
            self.stop.wait(self.interval)


class StatusSampler(threading.Thread):
    """The healer loop's counters from the daemon's status every
    ``interval`` seconds, in a thread of its own (as MemoryEventsSampler)."""

    def __init__(self, healer_status: Callable[[], dict], t0: float, interval: float = 0.5):
        super().__init__(daemon=True, name="flagship-status")
        self.healer_status, self.t0, self.interval = healer_status, t0, interval
        self.stop = threading.Event()
        self.samples: list[dict] = []

    def run(self) -> None:
        prev: tuple[float, int] | None = None
        while not self.stop.is_set():
            try:
                st = self.healer_status()
            except DaemonError:
                st = None
            now = time.monotonic()
            if st is not None:
                sample, prev = tick_sample(st, now, self.t0, prev)
                self.samples.append(sample)
            self.stop.wait(self.interval)


def livelock_from(samples: list[tuple[float, int, int]]) -> dict | None:
    """The first second (or more) in which oom climbed in every interval
    while oom_kill stayed put: only -1000 tasks left, the allocation spins."""
    start = None
    for (t0, oom0, kill0), (t1, oom1, kill1) in zip(samples, samples[1:], strict=False):
        if oom1 > oom0 and kill1 == kill0:
            start = start or (t0, oom0)
            if t1 - start[0] >= 1.0:
                return {
                    "t": start[0],
                    "oom_per_second": round((oom1 - start[1]) / (t1 - start[0])),
                    "oom_kill": kill1,
                }
        else:
            start = None
    return None


def _status(exit_status, end_reason) -> int | None:
    """The daemon's record of the run's end as a Popen returncode (0, -9, ...)."""
    if isinstance(exit_status, int):
        return exit_status
    return None
