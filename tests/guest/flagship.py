"""The auto-healer's flagship scenario (issue 4, section 6) as reusable code.

One place for the logic, used by tests/guest/test_flagship_guest.py (which
asserts on the result) and by demo/story.py (which prints the timeline live).
Runs as root in the real-kernel guest::

    with Flagship(base, echo=print) as fs:   # app cgroup, the real shop in it, oomguard daemon
        a = fs.run_case("A")                 # the import finishes within the grace
        b = fs.run_case("B")                 # the import stalls past the grace

The set-up:

* an app cgroup with a tight ``memory.max`` (and ``memory.swap.max`` 0);
* the real shop (nginx -> php-fpm -> MariaDB, shop.py) started *inside* it, so
  every page it touches is charged there;
* ``oomguard daemon`` with its default policy (MariaDB at -1000, php-fpm and
  nginx masters at -900/-800, php-fpm workers at 200), ``[layout] app_cgroup``
  naming the app cgroup (storm guard and livelock watch), ``[protect]
  allow_users = ["shopuser"]``, and a healer that watches the shop's URL (an
  http check every second, down after 2 failures), a grace of a few seconds
  with no time-of-day window (``window = []``), and the shop's own restart
  commands as ``[[healer.service]]`` (shop.restart_argv, joined shell-style:
  the daemon splits them with shlex and runs no shell).

A case: shopuser runs ``oom-protect python3 import.py`` inside the app cgroup.
The import loads data in small chunks:

* case A ("finish"): it needs exactly as much as the shop's killable processes
  hold. It grows while anything killable (oom_score_adj > -1000) is left in
  the app cgroup, so the kernel must kill php-fpm and nginx to make room, then
  it stops growing, "writes its results" for a second and exits 0, well
  within the grace. (Real imports don't look at the cgroup; this one does so
  that the outcome, everything killable gone and no livelock, is the same on
  every run instead of depending on a hand-tuned size.)
* case B ("stall"): it keeps asking for more than exists. Once only -1000
  tasks are left (the import and MariaDB) it spins in the page fault:
  ``memory.events`` oom climbs, oom_kill stays put. It ignores SIGTERM, like
  an import stuck in the kernel, so the healer's SIGKILL of the run's own
  cgroup (cgroup.kill) is what ends it.

While a case runs, a loop watches, and every step goes on a timeline with its
time since the case began: our own probe of the shop URL, the kernel log
(/dev/kmsg, followed live), the shop's processes, the app cgroup's
memory.events, the import's own output, and the daemon's events (its control
socket, the same data as ``oomguard events --json``, which is read once more
at the end). ``CaseResult.figures`` has the measured downtime, the time from
grace expiry to the protected processes being gone and to the shop answering
again, and the healer loop's tick times while the app cgroup thrashes.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

GUEST_DIR = Path(__file__).resolve().parent
if str(GUEST_DIR) not in sys.path:
    sys.path.insert(0, str(GUEST_DIR))

from daemon_fixture import BIN, RunningDaemon, start_daemon  # noqa: E402
from shop import COMM, Shop  # noqa: E402

from oomguard.cli.client import DaemonError, request  # noqa: E402

PY = sys.executable
OOM_PROTECT = str(BIN / "oom-protect")
CGROUP_ROOT = Path("/sys/fs/cgroup")
APP_USER = "shopuser"

LIMIT = 320 << 20  # the app cgroup's memory.max: the shop uses ~200 MiB of it
GRACE = 8.0  # seconds, the healer's default grace (no window applies)
TERM_TIMEOUT = 2.0  # SIGTERM -> SIGKILL
CHUNK = 512 << 10  # the import loads its data in 512 KiB pieces
CASE_TIMEOUT = 150.0  # generous: a case normally takes 20-30 s of guest time

# The import: argv[1] = "finish" | "stall", argv[2] = the app cgroup's directory.
IMPORT_PY = r"""
import os, signal, sys, time
mode, app, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "stall":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # like an import stuck in the kernel
adj = open("/proc/self/oom_score_adj").read().strip()
cg = open("/proc/self/cgroup").read().strip().split("::")[-1]
print(f"started: pid {os.getpid()}, oom_score_adj {adj}, cgroup {cg}", flush=True)

def killable_left():
    # the whole app cgroup: under systemd its processes live in the units' cgroups below it
    for d, _, _ in os.walk(app):
        try:
            pids = open(d + "/cgroup.procs").read().split()
        except OSError:
            continue
        for pid in pids:
            try:
                st = open(f"/proc/{pid}/stat").read()
                if st[st.rindex(")") + 2] == "Z":
                    continue
                if int(open(f"/proc/{pid}/oom_score_adj").read()) > -1000:
                    return True
            except (OSError, ValueError):
                continue
    return False

data = []
step = (64 << 20) // chunk
while True:
    data.append(b"\x01" * chunk)  # memset: every page is touched now
    if len(data) % step == 0:
        print(f"loaded {len(data) * chunk >> 20} MiB", flush=True)
    if mode == "finish" and not killable_left():
        break
print(f"loaded all {len(data) * chunk >> 20} MiB; writing the results", flush=True)
# An import lets go of its load buffers before it writes. Here it also
# matters: at the limit with only -1000 tasks left, any page fault (its own
# exit faulting code back in on a loaded host, systemd's ExecStopPost of a
# stopped unit) spins as in Case B.
del data[-((32 << 20) // chunk):]  # 32 MiB, each chunk its own mmap, unmapped now
time.sleep(1.0)
print("done", flush=True)
"""

KILLED = re.compile(
    r"Killed process (?P<pid>\d+) \((?P<comm>.*?)\) total-vm:\d+kB, anon-rss:(?P<anon>\d+)kB"
    r".*?UID:(?P<uid>\d+).*?oom_score_adj:(?P<adj>-?\d+)"
)
NO_KILLABLE = "Out of memory and no killable processes"


# =============================================================================
# small helpers


def ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--user-group", "--shell", "/bin/bash", name],
                       check=True)  # fmt: skip
        return pwd.getpwnam(name)


def read_adj(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/oom_score_adj").read_text())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return st[st.rindex(")") + 2] != "Z"


def flat_keyed(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}
    except (OSError, ValueError):
        return {}


def _one(pids: list[int]) -> str:
    return str(pids[0]) if pids else "-"


def exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit {code}"


# =============================================================================
# the timeline


@dataclass
class Step:
    t: float  # seconds since the case began
    text: str
    source: str  # scenario, probe, kernel, shop, cgroup, import, oomguard


class Timeline:
    """Steps with their times. With ``echo``, steps are printed as they come,
    held back ``delay`` seconds and sorted, since some sources (the daemon's
    events, our polling) report a little after the fact."""

    def __init__(self, echo: Callable[[str], None] | None = None, delay: float = 1.0):
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.steps: list[Step] = []
        self.echo = echo
        self.delay = delay
        self._printed = 0
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def at(self, t: float, text: str, source: str = "scenario") -> Step:
        step = Step(round(t, 2), text, source)
        with self._lock:
            self.steps.append(step)
        return step

    def add(self, text: str, source: str = "scenario") -> Step:
        return self.at(self.now(), text, source)

    def at_wall(self, wall: float, text: str, source: str) -> Step:
        return self.at(wall - self.wall0, text, source)

    def flush(self, force: bool = False) -> None:
        if self.echo is None:
            return
        with self._lock:
            limit = float("inf") if force else self.now() - self.delay
            pending = sorted(self.steps[self._printed:], key=lambda s: s.t)
            ready = [s for s in pending if s.t <= limit]
            rest = [s for s in pending if s.t > limit]
            self.steps[self._printed:] = ready + rest
            self._printed += len(ready)
        for s in ready:
            self.echo(format_step(s))

    def sorted(self) -> list[Step]:
        return sorted(self.steps, key=lambda s: s.t)


def format_step(s: Step) -> str:
    return f"[{s.t:6.1f}s] {s.text}"


# =============================================================================
# watchers


class KmsgFollower:
    """/dev/kmsg from now on: OOM kills and the no-killable flood. Times come
    from the kernel's own stamps (mapped onto time.monotonic through a marker
    we write), so a busy reader does not skew them."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self.fd, 0, os.SEEK_END)
        # kmsg stamps are local_clock(), which tracks CLOCK_MONOTONIC closely;
        # the marker measures what is left of the difference.
        self.offset = 0.0  # monotonic - kmsg seconds
        marker = f"oomguard-flagship: sync {os.getpid()} {time.monotonic_ns()}"
        wfd = os.open("/dev/kmsg", os.O_WRONLY)
        try:  # the newline ends the record; without it the kernel holds it back
            before = time.monotonic()
            os.write(wfd, (marker + "\n").encode())
            written = (before + time.monotonic()) / 2
        finally:
            os.close(wfd)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            for usec, text in self._records(50):
                if text == marker:
                    self.offset = written - usec / 1e6
                    return
            time.sleep(0.01)

    def _records(self, limit: int) -> list[tuple[int, str]]:
        out = []
        while len(out) < limit:
            try:
                raw = os.read(self.fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except BrokenPipeError:  # the ring overran us: go on with what is left
                continue
            head, _, body = raw.partition(";")
            fields = head.split(",")
            usec = int(fields[2]) if len(fields) > 2 and fields[2].isdigit() else 0
            out.append((usec, body.split("\n", 1)[0]))
        return out

    def read(self, limit: int = 2000) -> tuple[list[tuple[float, str]], bool]:
        """New records as (monotonic time, text); and whether we skipped a
        flood (more than ``limit`` waiting: the rest is dropped, we jump to the
        end; only the no-killable flood produces that much)."""
        recs = self._records(limit)
        skipped = False
        if len(recs) >= limit:
            os.lseek(self.fd, 0, os.SEEK_END)
            skipped = True
        return [(usec / 1e6 + self.offset, text) for usec, text in recs], skipped

    def close(self) -> None:
        os.close(self.fd)


class LogTail:
    """New lines of the daemon's log (it has no timestamps: they are stamped
    when read, within a tenth of a second)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size
        self.partial = b""

    def read(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        return [line.decode(errors="replace") for line in lines]


HEALER_LOG = re.compile(r"^<\d>oomguard\.healer: (?P<msg>.*)$")


def decision(line: str) -> str | None:
    """A timeline line for the healer's log lines that events do not cover."""
    m = HEALER_LOG.match(line)
    if not m:
        return None
    msg = m["msg"]
    if msg.startswith("grace over") and "nothing to kill" in msg:
        return "oomguard healer: grace over; no protected process runs, nothing to kill"
    if msg.startswith("restarting "):
        what = msg.removeprefix("restarting ").replace(",", ", ")
        return f"oomguard healer: restarting {what}"
    if msg.endswith("still there after SIGTERM; SIGKILL"):
        run = re.match(r"(run \d+ of \S+)", msg)
        return f"oomguard healer: {run[1] if run else 'the run'} still there after SIGTERM: SIGKILL"
    return None


class Prober(threading.Thread):
    """Our own view of the shop: GET its URL every ``interval`` seconds."""

    def __init__(self, shop: Shop, interval: float = 0.25, timeout: float = 2.0):
        super().__init__(daemon=True, name="flagship-prober")
        self.shop, self.interval, self.timeout = shop, interval, timeout
        self.stop = threading.Event()
        self.results: list[tuple[float, bool, str]] = []  # (monotonic start, ok, detail)

    def probe(self) -> tuple[bool, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.shop.port, timeout=self.timeout)
        try:
            conn.request("GET", "/index.php")
            resp = conn.getresponse()
            body = resp.read(4096).decode(errors="replace")
            if resp.status == 200 and self.shop.expected_body in body:
                return True, "HTTP 200 with the token from MariaDB"
            return False, f"HTTP {resp.status} {resp.reason}"
        except TimeoutError:
            return False, f"no answer within {self.timeout:g}s"
        except http.client.RemoteDisconnected:
            return False, "connection closed without an answer"
        except (OSError, http.client.HTTPException) as e:
            return False, getattr(e, "strerror", None) or type(e).__name__
        finally:
            conn.close()

    def run(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            ok, detail = self.probe()
            self.results.append((start, ok, detail))
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - start)))


# =============================================================================
# results


@dataclass
class CaseResult:
    case: str  # "A" or "B"
    title: str
    steps: list[Step]
    app_cgroup: str  # e.g. /flagship-app-123
    limit: int
    grace: float
    import_pid: int | None = None
    import_status: int | None = None  # Popen returncode: 0, -9, ...
    import_output: list[str] = field(default_factory=list)
    run: dict | None = None  # the daemon's record of the import's run
    victims: list[dict] = field(default_factory=list)  # kernel OOM kills seen in /dev/kmsg
    kmsg_no_killable: bool = False
    mariadb_pid_before: int | None = None
    mariadb_pid_after: int | None = None
    mariadb_adj: int | None = None
    mariadb_alive: bool = False
    memory_events_before: dict = field(default_factory=dict)
    memory_events_after: dict = field(default_factory=dict)
    livelock_seen: dict | None = None  # our own sample: oom climbing, oom_kill flat
    events: list[dict] = field(default_factory=list)  # the daemon's events during the case
    healer_status: dict = field(default_factory=dict)  # `status` healer section at the end
    tick_samples: list[dict] = field(default_factory=list)
    healthy_at_end: bool = False
    finished: bool = False  # the case reached its end (not the time-out)
    figures: dict = field(default_factory=dict)

    def healer_actions(self) -> list[str]:
        return [e["data"].get("action") for e in self.events if e["kind"] == "healer"]

    def events_of(self, kind: str, **match) -> list[dict]:
        return [e for e in self.events if e["kind"] == kind
                and all(e["data"].get(k) == v for k, v in match.items())]  # fmt: skip

    def as_dict(self) -> dict:
        d = asdict(self)
        d["steps"] = [[s.t, s.text] for s in self.steps]
        return d


# =============================================================================
# the scenario


def tick_sample(st: dict, now: float, t0: float, prev: tuple[float, int] | None) -> tuple[dict, tuple[float, int]]:
    """One sample of the healer loop's counters from its status, with the
    tick period since ``prev`` (monotonic time, ticks); and the next prev."""
    loop = st["loop"]
    sample = {"t": round(now - t0, 2), "ticks": loop["ticks"], "last_tick_seconds": loop["last_tick_seconds"],
              "max_tick_seconds": loop["max_tick_seconds"], "livelock": st["livelock"]["active"],
              "phase": st["phase"]}  # fmt: skip
    if prev is not None and loop["ticks"] > prev[1]:
        sample["period"] = round((now - prev[0]) / (loop["ticks"] - prev[1]), 3)
    return sample, (now, loop["ticks"])


class CaseWatch:
    """What a case's watch loop follows in both guests, each round turned
    into timeline steps as it comes: the import's output, our probe's
    verdicts, the kernel log's kills and the daemon's events. ``victim`` is
    the case's own (it says what the import is doing)."""

    def __init__(self, tl: Timeline, prober: Prober, kmsg: KmsgFollower, res: CaseResult,
                 victim: Callable[..., None]) -> None:  # fmt: skip
        self.tl, self.prober, self.kmsg, self.res, self.victim = tl, prober, kmsg, res, victim
        self.out_lines: list[tuple[float, str]] = []  # appended by the case's reader thread
        self._printed = 0
        self._probed = 0
        self._shop_up = True
        self.down_at: float | None = None
        self.up_again_at: float | None = None
        self._seen_ids: set[int] = set()
        self.recovered = False

    def follow_output(self, proc: subprocess.Popen, at_end: Callable[[], None] | None = None) -> threading.Thread:
        """A thread that reads ``proc``'s output into ``out_lines``, waits
        for it, then calls ``at_end``."""

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.out_lines.append((time.monotonic(), line.rstrip("\n")))
            proc.wait()
            if at_end is not None:
                at_end()

        t = threading.Thread(target=read, daemon=True, name="flagship-output")
        t.start()
        return t

    def output(self) -> None:
        while self._printed < len(self.out_lines):
            t, line = self.out_lines[self._printed]
            self._printed += 1
            self.tl.at(t - self.tl.t0, f"import: {line}", "import")

    def probes(self) -> None:
        tl = self.tl
        while self._probed < len(self.prober.results):
            t, ok, detail = self.prober.results[self._probed]
            self._probed += 1
            if self._shop_up and not ok:
                self._shop_up = False
                if self.down_at is None:
                    self.down_at = t - tl.t0
                    tl.at(self.down_at, f"our probe: shop DOWN ({detail})", "probe")
            elif not self._shop_up and ok:
                self._shop_up = True
                if self.down_at is not None and self.up_again_at is None:
                    self.up_again_at = t - tl.t0
                    tl.at(self.up_again_at, f"our probe: shop answers again ({detail}); down for "
                                            f"{self.up_again_at - self.down_at:.1f}s", "probe")  # fmt: skip

    def kernel(self) -> None:
        """The kernel log's kills and its "no killable processes"; a flood
        that overran our reader counts as the latter."""
        recs, skipped = self.kmsg.read()
        for t, text in recs:
            if m := KILLED.search(text):
                self.victim(t - self.tl.t0, int(m["pid"]), m["comm"], int(m["uid"]), int(m["adj"]),
                            int(m["anon"]), "kmsg")  # fmt: skip
            elif NO_KILLABLE in text and not self.res.kmsg_no_killable:
                self.res.kmsg_no_killable = True
                self.tl.at(t - self.tl.t0, f'kernel: "{NO_KILLABLE}" (on every retry)', "kernel")
        if skipped:
            self.res.kmsg_no_killable = True

    def daemon_events(self, rows: list[dict], import_pid: int) -> list[dict]:
        """The daemon's events not seen before, on the timeline; returns them."""
        tl, new = self.tl, []
        for e in rows:
            if e["id"] in self._seen_ids:
                continue
            self._seen_ids.add(e["id"])
            new.append(e)
            d = e["data"]
            if e["kind"] == "oom_kill" and d.get("victim_pid") is not None:
                # the same kernel report, as oomguard parsed it (ours may have
                # scrolled away in the flood that follows the last kill)
                t_k = (d["ts_usec"] / 1e6 + self.kmsg.offset - tl.t0 if d.get("ts_usec")
                       else e["ts"] - tl.wall0)  # fmt: skip
                self.victim(t_k, d["victim_pid"], d.get("victim_comm") or "?", d.get("victim_uid"),
                            d.get("oom_score_adj"), d.get("anon_rss_kb") or 0, "oomguard")  # fmt: skip
            for text in describe(e, tl.wall0, import_pid):
                tl.at_wall(e["ts"], text, "oomguard")
            if e["kind"] == "healer" and d.get("action") == "down":
                tl.at_wall(d["since"] + d["grace"], f"the {d['grace']:g}s grace expires", "oomguard")
            if e["kind"] == "healer" and d.get("action") == "recovered":
                self.recovered = True
        return new


class Flagship:
    """The app cgroup, the shop inside it and the daemon; ``run_case`` plays
    one case. A context manager: everything is stopped and removed after."""

    def __init__(
        self,
        base: Path | str | None = None,
        *,
        echo: Callable[[str], None] | None = None,
        limit: int = LIMIT,
        grace: float = GRACE,
        ports: tuple[int, int, int] = (8480, 3317, 9010),
    ):
        self._own_base = base is None  # removed by close()
        self.base = Path(base or tempfile.mkdtemp(dir="/tmp", prefix="oomguard-flagship-"))
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)  # www-data and mysql must get through
        self.echo = echo
        self.limit = limit
        self.grace = grace
        self.ports = ports
        self.app_name = f"flagship-app-{os.getpid()}"
        self.app_dir = CGROUP_ROOT / self.app_name
        self.app_cgroup = "/" + self.app_name
        self.user = ensure_user(APP_USER)
        self.shop: Shop | None = None
        self.daemon: RunningDaemon | None = None
        self.setup_steps: Timeline | None = None

    # ---------------------------------------------------------------- set-up

    def __enter__(self) -> Flagship:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        tl = self.setup_steps = Timeline(self.echo, delay=0)
        root_ctl = CGROUP_ROOT / "cgroup.subtree_control"
        if "memory" not in root_ctl.read_text().split():
            root_ctl.write_text("+memory +pids")
        self.app_dir.mkdir(exist_ok=True)
        (self.app_dir / "memory.max").write_text(str(self.limit))
        (self.app_dir / "memory.swap.max").write_text("0")
        tl.add(f"app cgroup {self.app_cgroup}: memory.max {self.limit >> 20} MiB, no swap")
        tl.flush()
        tl.add("starting the shop inside it: nginx -> php-fpm 8.2 (4 workers) -> MariaDB 10.11")
        tl.flush()
        port, db_port, fpm_port = self.ports
        self.shop = Shop(self.base / "shop", port=port, db_port=db_port, fpm_port=fpm_port,
                         cgroup=self.app_dir, max_children=4)  # fmt: skip
        self.shop.start(timeout=180)
        cur = int((self.app_dir / "memory.current").read_text())
        tl.add(f"the shop answers at {self.shop.url}; the cgroup uses {cur >> 20} MiB")
        tl.flush()
        self.daemon = start_daemon(self.base / f"daemon-{os.getpid()}", self.config_toml(),
                                   allow_users=(APP_USER,))  # fmt: skip
        tl.add(f"oomguard daemon up (pid {self.daemon.proc.pid}): the healer probes the shop URL "
               f"every 1s, grace {self.grace:g}s")  # fmt: skip
        tl.flush()

    def config_toml(self) -> str:
        assert self.shop is not None
        services = "".join(
            f'[[healer.service]]\nname = "{name}"\nrestart = {json.dumps(shlex.join(self.shop.restart_argv(name)))}\n'
            for name in ("php-fpm", "nginx")
        )
        return f"""
[layout]
app_cgroup = "{self.app_name}"
[healer]
grace = "{self.grace:g}s"
timezone = "UTC"
window = []
term_timeout = "{TERM_TIMEOUT:g}s"
restart_backoff = "3s"
restart_tries = 4
[[healer.check]]
name = "shop"
http = "{self.shop.url}"
interval = "1s"
timeout = "2s"
failures = 2
{services}"""

    def close(self) -> None:
        if self.shop is not None:
            with contextlib.suppress(Exception):
                self.shop.stop(timeout=20)
        if self.daemon is not None:
            self.daemon.stop()
        if self.app_dir.exists():
            with contextlib.suppress(OSError):
                (self.app_dir / "cgroup.kill").write_text("1")
            deadline = time.monotonic() + 10
            while flat_keyed(self.app_dir / "cgroup.events").get("populated") and time.monotonic() < deadline:
                time.sleep(0.05)
            for sub in sorted((p for p in self.app_dir.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                self.app_dir.rmdir()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    # ---------------------------------------------------------------- daemon access

    def ask(self, op: str, **fields) -> dict:
        assert self.daemon is not None
        return request(op, self.daemon.socket, timeout=20, **fields)

    def healer_status(self) -> dict:
        return self.ask("status")["healer"]

    def events_cli(self, since: float) -> list[dict]:
        """``oomguard events --json --since`` (the CLI, as an operator would)."""
        assert self.daemon is not None
        when = datetime.fromtimestamp(int(since) - 1, UTC).isoformat()  # absolute
        r = self.daemon.cli("events", "--json", "--since", when, "--limit", "100000")
        return [e for e in json.loads(r.stdout) if e["ts"] >= since]

    # ---------------------------------------------------------------- before a case

    def ready(self, timeout: float = 90) -> None:
        """The shop answers, MariaDB is at -1000 (the daemon's policy), and
        the healer is watching (no incident open)."""
        assert self.shop is not None
        deadline = time.monotonic() + timeout
        if not self.shop.healthy(timeout=5):
            for name in ("mariadbd", "php-fpm", "nginx"):
                if not self.shop.pids()[name]:
                    self.shop.start_service(name, timeout=60)
        self.wait_ready(deadline)

    def shop_ready(self, pids: dict[str, list[int]]) -> bool:
        """What the case needs of the shop's processes beyond MariaDB's -1000."""
        return True

    def wait_ready(self, deadline: float) -> None:
        assert self.shop is not None
        while True:
            pids = self.shop.pids()
            db = pids["mariadbd"][0] if pids["mariadbd"] else None
            st = self.healer_status()
            ok = (self.shop.healthy(timeout=5) and db is not None and read_adj(db) == -1000
                  and self.shop_ready(pids) and st["phase"] == "watching" and not st["down"]
                  and st["checks"]["shop"]["healthy"] is True)  # fmt: skip
            if ok:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready: pids {pids}, mariadbd adj {db and read_adj(db)}, "
                                     f"healer {st['phase']} down={st['down']} {st['checks']}")  # fmt: skip
            time.sleep(0.25)

    # ---------------------------------------------------------------- a case

    def run_case(self, case: str) -> CaseResult:
        assert self.shop is not None and self.daemon is not None
        mode = {"A": "finish", "B": "stall"}[case]
        title = {
            "A": "Case A: the import finishes within the grace",
            "B": "Case B: the import stalls past the grace",
        }[case]
        self.ready()
        tl = Timeline(self.echo)
        shop = self.shop
        res = CaseResult(case, title, tl.steps, self.app_cgroup, self.limit, self.grace)
        pids0 = shop.pids()
        db = pids0["mariadbd"][0]
        res.mariadb_pid_before, res.mariadb_adj = db, read_adj(db)
        res.memory_events_before = flat_keyed(self.app_dir / "memory.events")
        cur = int((self.app_dir / "memory.current").read_text())
        tl.add(f"the shop answers; the app cgroup uses {cur >> 20} of {self.limit >> 20} MiB")
        tl.add(f"MariaDB pid {db} (oom_score_adj {res.mariadb_adj}); php-fpm master "
               f"{_one(pids0['php-fpm'])} + {len(pids0['php-fpm-workers'])} workers; nginx master "
               f"{_one(pids0['nginx'])} + {len(pids0['nginx-workers'])} worker")  # fmt: skip
        what = ("needs what the killable processes hold, then finishes"
                if mode == "finish" else "wants more than exists; ignores SIGTERM")
        tl.add(f"{APP_USER} runs: oom-protect python3 import.py   ({what})")
        tl.flush()

        kmsg = KmsgFollower()
        prober = Prober(shop)
        prober.start()
        since = tl.wall0  # nothing before is ours (the import starts after)
        env = {"HOME": self.user.pw_dir, "USER": APP_USER, "LOGNAME": APP_USER, "LANG": "C.UTF-8",
               "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OOMGUARD_SOCKET": self.daemon.socket}  # fmt: skip
        # a shell enters the app cgroup, then execs (same pid): setpriv -> oom-protect -> python
        # (no preexec_fn: our prober thread is already running)
        argv = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.app_dir / "cgroup.procs"),
                "setpriv", f"--reuid={self.user.pw_uid}", f"--regid={self.user.pw_gid}", "--init-groups",
                "--", OOM_PROTECT, PY, "-I", "-S", "-c", IMPORT_PY, mode, str(self.app_dir), str(CHUNK)]  # fmt: skip
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
        res.import_pid = proc.pid
        exited_at: list[float] = []

        def victim(t: float, pid: int, comm: str, uid: int | None, adj: int | None, anon_kb: int,
                   source: str) -> None:  # fmt: skip
            if any(v["pid"] == pid for v in res.victims):
                return
            v = {"t": round(t, 2), "pid": pid, "comm": comm, "uid": uid, "oom_score_adj": adj,
                 "anon_rss_kb": anon_kb, "seen_in": source}  # fmt: skip
            res.victims.append(v)
            ended = bool(exited_at) and exited_at[0] - tl.t0 <= t
            adj_now = read_adj(proc.pid) if alive(proc.pid) else None
            imp = ("the import has already ended" if ended else
                   f"import (pid {proc.pid}, oom_score_adj {adj_now if adj_now is not None else -1000}) keeps going")  # fmt: skip
            tl.at(t, f"kernel OOM-killed {comm} (pid {pid}, oom_score_adj {adj}); {imp}", "kernel")

        watch = CaseWatch(tl, prober, kmsg, res, victim)
        reader = watch.follow_output(proc, lambda: exited_at.append(time.monotonic()))

        # ---- watch until the shop is back after the healer acted (or the time-out)
        log = LogTail(self.daemon.log)
        known = {k: set(v) for k, v in pids0.items()}
        mem_prev: tuple[float, dict] | None = None
        flat_since: tuple[float, dict] | None = None
        tick_prev: tuple[float, int] | None = None
        next_slow = 0.0
        deadline = time.monotonic() + CASE_TIMEOUT
        while time.monotonic() < deadline:
            now = time.monotonic()
            watch.output()
            if exited_at and not any(s.source == "import-exit" for s in tl.steps):
                res.import_status = proc.returncode
                tl.at(exited_at[0] - tl.t0, f"import (pid {proc.pid}) ended: {exit_text(proc.returncode)}",
                      "import-exit")  # fmt: skip
            watch.probes()
            # the daemon's decisions that have no event of their own (read as they are logged)
            for line in log.read():
                if text := decision(line):
                    tl.add(text, "oomguard")
            watch.kernel()
            if now >= next_slow:
                next_slow = now + 0.5
                # the shop's processes: who is back
                cur_pids = shop.pids()
                for name, comm in (("php-fpm", COMM["php-fpm"]), ("nginx", COMM["nginx"])):
                    for pid in cur_pids[name]:
                        if pid not in known[name]:
                            known[name].add(pid)
                            w = len(cur_pids[f"{name}-workers"])
                            tl.add(f"{comm} master is back (pid {pid}, {w} workers)", "shop")
                # memory.events: the livelock as the cgroup shows it
                ev = flat_keyed(self.app_dir / "memory.events")
                if mem_prev is not None:
                    t_prev, ev_prev = mem_prev
                    climbing = ev.get("oom", 0) > ev_prev.get("oom", 0)
                    flat = ev.get("oom_kill", 0) == ev_prev.get("oom_kill", 0)
                    if climbing and flat:
                        if flat_since is None:
                            flat_since = (t_prev, ev_prev)
                        t1, e1 = flat_since
                        if res.livelock_seen is None and now - t1 >= 1.0:
                            rate = (ev["oom"] - e1["oom"]) / (now - t1)
                            res.livelock_seen = {"t": round(t1 - tl.t0, 2), "oom_per_second": round(rate),
                                                 "oom_kill": ev["oom_kill"]}  # fmt: skip
                            tl.at(t1 - tl.t0, f"memory.events: oom +{rate:.0f}/s, oom_kill stuck at "
                                              f"{ev['oom_kill']}: only -1000 tasks left, the import spins",
                                  "cgroup")  # fmt: skip
                    else:
                        flat_since = None
                mem_prev = (now, ev)
                # the daemon: its events, and its healer loop
                try:
                    rows = self.ask("events", since=since, limit=100000)["events"]
                    st = self.healer_status()
                except DaemonError as e:
                    rows, st = [], None
                    tl.add(f"(cannot reach the daemon: {e})", "oomguard")
                watch.daemon_events(rows, proc.pid)
                if st is not None:
                    sample, tick_prev = tick_sample(st, now, tl.t0, tick_prev)
                    res.tick_samples.append(sample)
            tl.flush()
            if watch.recovered and exited_at and watch.up_again_at is not None:
                res.finished = True
                break
            time.sleep(0.1)

        # ---- after the case
        prober.stop.set()
        prober.join(5)
        kmsg.close()
        if not exited_at:  # the time-out: leave nothing behind for the next case
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGKILL)
            reader.join(10)
        res.import_status = proc.returncode
        res.import_output = [line for _, line in watch.out_lines]
        time.sleep(0.6)  # the reaper (0.5 s) ends the run
        # a restart try's event is stored when its commands return, which can be
        # a moment after the first healthy probe
        settle = time.monotonic() + 15
        while res.finished and time.monotonic() < settle and not any(
            e["data"].get("action") == "restart"
            for e in self.ask("events", since=since, kinds=["healer"], limit=1000)["events"]
        ):
            time.sleep(0.25)
        res.events = [e for e in self.events_cli(since) if e["ts"] >= since]
        runs = [r for r in self.ask("runs", all=True)["runs"] if r["pid"] == proc.pid]
        res.run = runs[-1] if runs else None
        res.healer_status = self.healer_status()
        res.memory_events_after = flat_keyed(self.app_dir / "memory.events")
        pids1 = shop.pids()
        res.mariadb_pid_after = pids1["mariadbd"][0] if pids1["mariadbd"] else None
        res.mariadb_alive = alive(db)
        res.healthy_at_end = shop.healthy(timeout=5)
        res.figures = self.figures(res, tl, watch.down_at, watch.up_again_at,
                                   exited_at[0] - tl.t0 if exited_at else None)  # fmt: skip
        tl.flush(force=True)
        res.steps = tl.sorted()
        return res

    def figures(self, res: CaseResult, tl: Timeline, down_at: float | None, up_at: float | None,
                import_end: float | None) -> dict:  # fmt: skip
        """The measured figures (seconds; None when not seen). Times "after
        expiry" count from the moment the grace ran out by the daemon's clock:
        the first failing probe of the outage ("down" event ``since``) plus
        the grace."""
        f: dict = {"limit_mib": res.limit >> 20, "grace": res.grace}
        down = res.events_of("healer", action="down")
        rec = res.events_of("healer", action="recovered")
        killed = res.events_of("healer", action="killed")
        restart = res.events_of("healer", action="restart")
        expiry = down[0]["data"]["since"] + down[0]["data"]["grace"] - tl.wall0 if down else None
        rel = lambda e: round(e["ts"] - tl.wall0, 2)  # noqa: E731
        f["our_probe_down_at"] = round(down_at, 2) if down_at is not None else None
        f["our_probe_up_at"] = round(up_at, 2) if up_at is not None else None
        f["downtime_our_probe"] = round(up_at - down_at, 2) if down_at is not None and up_at is not None else None
        f["downtime_daemon"] = rec[0]["data"]["downtime"] if rec else None
        f["daemon_down_since"] = round(down[0]["data"]["since"] - tl.wall0, 2) if down else None
        f["grace_expiry_at"] = round(expiry, 2) if expiry is not None else None
        f["import_ended_at"] = round(import_end, 2) if import_end is not None else None
        f["killed_event_at"] = rel(killed[0]) if killed else None
        f["restart_event_at"] = rel(restart[0]) if restart else None
        f["recovered_event_at"] = rel(rec[0]) if rec else None
        if expiry is not None:
            # protected processes gone: the import's exit (our child, seen at once)
            f["expiry_to_protected_gone"] = round(import_end - expiry, 2) if import_end is not None else None
            f["expiry_to_killed_event"] = round(rel(killed[0]) - expiry, 2) if killed else None
            f["expiry_to_healthy_our_probe"] = round(up_at - expiry, 2) if up_at is not None else None
            f["expiry_to_recovered_event"] = round(rel(rec[0]) - expiry, 2) if rec else None
        if restart:
            svc = restart[0]["data"].get("services", [])
            f["restart_try_ok"] = [s.get("ok") for s in svc]
        loop = res.healer_status.get("loop", {})
        f["healer_tick_interval"] = loop.get("interval")
        f["healer_max_tick_seconds"] = loop.get("max_tick_seconds")
        thrash = [s for s in res.tick_samples if s["livelock"] or s["phase"] in ("terminating", "killing")]
        during = thrash or res.tick_samples
        f["healer_last_tick_max_sampled"] = max((s["last_tick_seconds"] for s in during), default=None)
        periods = [s["period"] for s in during if "period" in s]
        f["healer_loop_period_max_sampled"] = max(periods, default=None)
        f["healer_loop_period_mean_sampled"] = round(sum(periods) / len(periods), 3) if periods else None
        f["oom_events"] = res.memory_events_after.get("oom", 0) - res.memory_events_before.get("oom", 0)
        f["oom_kills"] = res.memory_events_after.get("oom_kill", 0) - res.memory_events_before.get("oom_kill", 0)
        f["kernel_victims"] = len(res.victims)
        # oomguard's oom_kill events without a victim: reports whose tail was lost
        # when the no-killable flood overran the kernel log (kmsg.py stores them)
        f["daemon_oom_kill_events"] = len(res.events_of("oom_kill"))
        f["daemon_oom_kill_events_without_victim"] = len(res.events_of("oom_kill", victim_pid=None))
        return f


def describe(e: dict, wall0: float, import_pid: int) -> list[str]:
    """The timeline lines for one daemon event ([] for the ones we show
    otherwise: kernel kills come from /dev/kmsg, policy writes are noise)."""
    d, kind = e["data"], e["kind"]
    if kind == "grant" and d.get("pid") == import_pid:
        return [f"oomguard: protection granted, run {d['id']}, pid {d['pid']}, own cgroup "
                f".../{d['cgroup'].rsplit('/', 1)[-1]}"]  # fmt: skip
    if kind == "run_end" and d.get("pid") == import_pid:
        peak = d.get("peak_memory")
        peak = f", peak memory {peak >> 20} MiB" if peak else ""
        return [f"oomguard: run {d['id']} ended ({d.get('end_reason')}){peak}"]
    if kind == "storm":
        rate = f"{d.get('kills_per_second', 0):.1f} OOM kills/s"
        if d.get("action") == "kill_nonessential":
            k = ", ".join(f"{x['comm']} {x['pid']}" for x in d.get("killed", []))
            return [f"oomguard storm guard: {rate}: " + (f"killed non-essential {k}" if k else
                    "nothing non-essential left to kill")]  # fmt: skip
        return [f"oomguard storm guard: {rate}: {d.get('action')} ({d.get('reason', '')})"]
    if kind == "oom_livelock":
        if d.get("state") == "started":
            return [f"oomguard: OOM LIVELOCK in {d.get('cgroup')} (oom "
                    f"{d.get('oom_per_second', 0):.0f}/s, oom_kill flat at {d.get('oom_kill')})"]  # fmt: skip
        if d.get("state") == "ended":
            return [f"oomguard: livelock over after {d.get('duration', 0):.1f}s"]
        return []  # the kernel-log flavour (oomwatch) repeats what memory.events showed
    if kind != "healer":
        return []
    a = d.get("action")
    who = f"run {d['run']} of {d.get('owner')}" if d.get("run") is not None else d.get("target")
    if a == "down":
        since = d["since"] - wall0
        return [f"oomguard: shop DOWN since {since:.1f}s; window {d['window']}, grace "
                f"{d['grace']:g}s: the healer acts at {since + d['grace']:.1f}s"]  # fmt: skip
    if a == "term":
        pids = ", ".join(map(str, d["pids"]))
        return [f"oomguard healer: {who} still runs: SIGTERM to pid {pids}"]
    if a in ("killed", "kill_failed", "spared_some", "already_gone"):
        stalled = ", ".join(f"pid {p} in state {s}" for p, s in d.get("stalled", []))
        how = f"SIGKILL via {d['method']}" + (f"; it was stalled: {stalled}" if stalled else "")
        return [f"oomguard healer: {who} {a.replace('_', ' ')}: {how}"]
    if a == "restart":
        svc = ", ".join(f"{s['service']} ({'ok' if s['ok'] else 'FAILED'})" for s in d.get("services", []))
        return [f"oomguard healer: restarted {svc}, try {d['try']} of {d['tries']}"]
    if a == "recovered":
        killed = (f"killed run {', '.join(map(str, d['killed_runs']))}" if d.get("killed_runs")
                  else "killed nothing")  # fmt: skip
        acted = f"restarted services, {killed}" if d.get("acted") else "the healer did not act"
        return [f"oomguard: shop healthy again after {d['downtime']:.1f}s down ({acted})"]
    if a == "gave_up":
        return [f"oomguard healer: GAVE UP after {d['tries']} restart tries"]
    return [f"oomguard healer: {a}"]


def summary_line(res: CaseResult) -> str:
    f = res.figures
    parts = [f"{res.title}: import {exit_text(res.import_status)}"]
    if f.get("downtime_our_probe") is not None:
        parts.append(f"downtime {f['downtime_our_probe']:.1f}s (daemon: {f.get('downtime_daemon')}s)")
    if f.get("expiry_to_protected_gone") is not None:
        g = f["expiry_to_protected_gone"]
        parts.append(f"protected processes gone {g:.1f}s after grace expiry" if g >= 0
                     else f"protected processes gone {-g:.1f}s before grace expiry")  # fmt: skip
    if f.get("expiry_to_healthy_our_probe") is not None:
        parts.append(f"shop healthy {f['expiry_to_healthy_our_probe']:.1f}s after grace expiry")
    parts.append(f"MariaDB pid {res.mariadb_pid_before} -> {res.mariadb_pid_after}")
    return "; ".join(parts)


def verdict(res: CaseResult) -> list[str]:
    """What went differently from the story (empty when the case behaved):
    a short version of test_flagship_guest.py's assertions, for the demo."""
    out = []
    comms = {v["comm"] for v in res.victims}
    pids = {v["pid"] for v in res.victims}
    actions = res.healer_actions()
    if not res.finished:
        out.append("the case did not reach its end in time")
    if not comms or not comms <= {COMM["php-fpm"], COMM["nginx"]}:
        out.append(f"kernel victims were {sorted(comms)}, not php-fpm and nginx")
    if res.import_pid in pids or res.mariadb_pid_before in pids:
        out.append("the kernel killed the import or MariaDB")
    if res.mariadb_pid_after != res.mariadb_pid_before or not res.mariadb_alive:
        out.append("MariaDB did not survive")
    if not res.healthy_at_end or "recovered" not in actions:
        out.append("the shop is not healthy again")
    if res.case == "A":
        if res.import_status != 0:
            out.append(f"the import ended with {exit_text(res.import_status)}")
        if "term" in actions or "killed" in actions:
            out.append("the healer killed something")
    else:
        if res.import_status != -signal.SIGKILL or "killed" not in actions:
            out.append(f"the healer did not kill the import ({exit_text(res.import_status)})")
        if not res.events_of("oom_livelock", state="started"):
            out.append("no livelock was reported")
    return out


def _slim(event: dict) -> dict:
    data = {k: v for k, v in event["data"].items() if k != "raw"}
    return {**event, "data": data}


def write_results(path: Path, results: list[CaseResult], extra: dict | None = None) -> None:
    """Merge the cases into a JSON file (other cases already there are kept)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data.setdefault("cases", {})
    for r in results:
        data["cases"][r.case] = {"title": r.title, "written": time.time(), "figures": r.figures,
                                 "timeline": [[s.t, s.text] for s in r.steps],
                                 "import_status": r.import_status, "victims": r.victims,
                                 "tick_samples": r.tick_samples,
                                 "events": [_slim(e) for e in r.events if e["kind"] != "policy"]}  # fmt: skip
    if extra:
        data.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


def main() -> int:
    """Both cases, printed live (what demo/story.py builds on)."""
    results = []
    with Flagship(echo=lambda line: print(line, flush=True)) as fs:
        for case in sys.argv[1:] or ["A", "B"]:
            results.append(fs.run_case(case))
    write_results(Path(os.environ.get("FLAGSHIP_RESULTS", "/results/flagship.json")), results)
    for r in results:
        print(json.dumps(r.figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
