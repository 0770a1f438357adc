"""Prometheus metrics for fleets, on a loopback port and/or in a textfile.

Every metric lives in the ``Metrics`` object's own registry (not the
process-wide default), so tests and reloads never see stale series.

Label cardinality is bounded: a victim's comm is chosen by whoever started it
and a cgroup path may name a per-run cgroup, so each keeps its own label only
while it is among the ``top_comms`` most frequent; the rest count as "other".
Each series is monotonic while it exists and every kill is counted exactly
once: a name that enters the top N starts a new series at its next kill
(earlier kills stay in "other"); one that drops out stops being exported.
"""

from __future__ import annotations

import logging
import math
import os
import re
import selectors
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import Collector

from oomguard import __version__
from oomguard.config import MetricsConfig, parse_listen  # the one check, shared with `config check`
from oomguard.host import statefile
from oomguard.telemetry.reasons import RefusalReason

log = logging.getLogger(__name__)

# The *_created series double every counter's output for a value no alert
# uses. This switch is process-wide; oomguard has no other registry user.
if hasattr(prometheus_client, "disable_created_metrics"):
    prometheus_client.disable_created_metrics()

OTHER = "other"
# Why the broker said no: the label values, every one exported from the start.
REFUSAL_REASONS = tuple(r.value for r in RefusalReason)
MAX_ACTIONS = 16  # distinct healer action labels before "other"
_ACTION = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_TRACKED_MAX = 1000  # names whose counts we remember, to rank them


def cgroup_label(cgroup: str | None) -> str:
    """A cgroup path cut to its first two levels: "/system.slice/nginx.service"
    stays, "/oomguard.app/run-7/x" becomes "/oomguard.app/run-7" -- enough to
    tell services and slices apart, bounded further by the top-N rule."""
    if not cgroup:
        return "unknown"
    parts = [p for p in cgroup.split("/") if p][:2]
    return "/" + "/".join(parts)


class _TopN:
    """Which names keep their own label: at most ``n``, the most frequent."""

    def __init__(self, n: int):
        self.n = n
        self.counts: dict[str, int] = {}
        self.labeled: set[str] = set()

    def see(self, name: str) -> tuple[str, str | None]:
        """Count a kill of ``name``; return (label to count it under, label
        whose series must be dropped or None)."""
        self.counts[name] = self.counts.get(name, 0) + 1
        if len(self.counts) > _TRACKED_MAX:
            # Forget the rarest unlabeled names; the ranking only needs the head.
            keep = sorted(self.counts, key=self.counts.__getitem__, reverse=True)[
                : _TRACKED_MAX // 2
            ]
            self.counts = {k: self.counts[k] for k in set(keep) | self.labeled | {name}}
        if name in self.labeled:
            return name, None
        if len(self.labeled) < self.n:
            self.labeled.add(name)
            return name, None
        weakest = min(self.labeled, key=lambda k: (self.counts.get(k, 0), k))
        # Twice the weakest's count, not just more: names of similar rank
        # would otherwise swap labels at every kill, and each swap is a new
        # series in Prometheus's database.
        if self.counts[name] >= 2 * self.counts.get(weakest, 0) + 1:
            self.labeled.discard(weakest)
            self.labeled.add(name)
            return name, weakest
        return OTHER, None


class _OomKills(Collector):
    """oomguard_oom_kills_total{comm, cgroup} with bounded labels."""

    def __init__(self, top: int):
        self.lock = threading.Lock()
        self.comms = _TopN(top)
        self.cgroups = _TopN(top)
        self.series: dict[tuple[str, str], int] = {}

    def add(self, comm: str, cgroup: str) -> None:
        with self.lock:
            c_label, c_drop = self.comms.see(comm)
            g_label, g_drop = self.cgroups.see(cgroup)
            if c_drop is not None:
                self.series = {k: v for k, v in self.series.items() if k[0] != c_drop}
            if g_drop is not None:
                self.series = {k: v for k, v in self.series.items() if k[1] != g_drop}
            key = (c_label, g_label)
            self.series[key] = self.series.get(key, 0) + 1

    def collect(self) -> Iterator[CounterMetricFamily]:
        fam = CounterMetricFamily(
            "oomguard_oom_kills",
            "Processes killed by the kernel OOM killer, by victim comm and cgroup (top N, then other).",
            labels=["comm", "cgroup"],
        )
        with self.lock:
            items = sorted(self.series.items())
        for (comm, cgroup), value in items:
            fam.add_metric([comm, cgroup], value)
        yield fam


class Metrics:
    """All of oomguard's metrics; implements telemetry.hooks.Hooks. Methods
    never raise on odd input: a metric is not worth a daemon crash."""

    def __init__(self, top_comms: int = 20):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._before_scrape = _BeforeScrape()
        r.register(self._before_scrape)  # first: it runs before any gauge is read
        self._kills = _OomKills(max(1, top_comms))
        r.register(self._kills)
        self._info = Gauge("oomguard_info", "oomguard's version.", ["version"], registry=r)
        self._info.labels(__version__).set(1)
        self._livelocks = Counter(
            "oomguard_oom_livelocks",
            "Kernel OOM reports that found nothing killable (Out of memory and no killable processes).",
            registry=r,
        )
        self._livelock = Gauge(
            "oomguard_oom_livelock",
            "1 while the kernel log reports OOMs with nothing killable (the last report under 30 s ago).",
            registry=r,
        )
        self._grants = Counter("oomguard_protect_grants", "Protected runs granted.", registry=r)
        self._refusals = Counter(
            "oomguard_protect_refusals",
            "Protect requests refused, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in REFUSAL_REASONS:
            self._refusals.labels(reason)  # export zeros so rate() works from the start
        self._protected = Gauge(
            "oomguard_protected_processes", "Processes protected now.", registry=r
        )
        self._downtime = Gauge(
            "oomguard_healer_downtime_seconds",
            "How long the app's health checks have been failing (0 when healthy).",
            registry=r,
        )
        self._down = Gauge(
            "oomguard_healer_down",
            "1 while the app's health checks have the shop down (an incident not yet recovered).",
            registry=r,
        )
        self._tick = Gauge(
            "oomguard_healer_tick_seconds", "How long the healer's last tick took.", registry=r
        )
        self._kill_rate = Gauge(
            "oomguard_healer_oom_kills_per_second",
            "OOM kills per second in the app cgroup over about the last second (memory.events).",
            registry=r,
        )
        self._healer_livelock = Gauge(
            "oomguard_healer_livelock",
            "1 while the app cgroup's oom count climbs and oom_kill stays put (memory.events).",
            ["cgroup"],
            registry=r,
        )
        self._actions = Counter(
            "oomguard_healer_actions", "Healer actions taken, by action.", ["action"], registry=r
        )
        self._action_names: set[str] = set()
        self._app_current = Gauge(
            "oomguard_app_memory_current_bytes",
            "The app slice's memory.current (NaN if unknown).",
            registry=r,
        )
        self._app_limit = Gauge(
            "oomguard_app_memory_limit_bytes",
            "The app slice's memory.max (NaN if unlimited or unknown).",
            registry=r,
        )
        self._psi_some = Gauge(
            "oomguard_memory_pressure_some_avg10_ratio",
            "Share of the last 10 s in which some task stalled on memory (PSI some avg10 / 100).",
            registry=r,
        )
        self._psi_full = Gauge(
            "oomguard_memory_pressure_full_avg10_ratio",
            "Share of the last 10 s in which all tasks stalled on memory (PSI full avg10 / 100).",
            registry=r,
        )
        self._lost = Counter(
            "oomguard_kmsg_lost_records",
            "Kernel log records lost to ring buffer overruns.",
            registry=r,
        )
        for g in (self._app_current, self._app_limit):
            g.set(math.nan)
        # Told of each kill after it is counted (the textfile writes at once).
        self.on_oom_kill: Callable[[], None] = lambda: None

    # -------------------------------------------------------------- updates

    def oom_kill(self, comm: str | None, cgroup: str | None) -> None:
        self._kills.add(comm or "unknown", cgroup_label(cgroup))
        self.on_oom_kill()

    def oom_livelock(self) -> None:
        self._livelocks.inc()

    def grant(self) -> None:
        self._grants.inc()

    def refusal(self, reason: RefusalReason | str) -> None:
        label = RefusalReason.parse(reason)
        if label != reason:
            log.debug("metrics: refusal reason %r counted as %s", reason, label)
        self._refusals.labels(label.value).inc()

    def set_protected(self, n: int) -> None:
        self._protected.set(max(0, int(n)))

    def set_downtime(self, seconds: float) -> None:
        self._downtime.set(max(0.0, float(seconds)))

    def set_healer_down(self, down: bool) -> None:
        self._down.set(1 if down else 0)

    def set_tick_seconds(self, seconds: float) -> None:
        self._tick.set(max(0.0, float(seconds)))

    def set_oom_kill_rate(self, per_second: float) -> None:
        self._kill_rate.set(max(0.0, float(per_second)))

    def set_healer_livelock(self, cgroup: str, active: bool) -> None:
        # One series: the healer watches one app cgroup.
        self._healer_livelock.labels(str(cgroup)).set(1 if active else 0)

    def healer_action(self, action: str) -> None:
        if not _ACTION.match(action or ""):
            action = OTHER
        elif action not in self._action_names:
            if len(self._action_names) >= MAX_ACTIONS:
                action = OTHER
            else:
                self._action_names.add(action)
        self._actions.labels(action).inc()

    def set_livelock(self, flag: bool) -> None:
        self._livelock.set(1 if flag else 0)

    def before_scrape(self, sample: Callable[[], None]) -> None:
        """Call ``sample`` (which sets gauges) at the start of every scrape
        and textfile write: figures only a reader wants are read when one
        asks, not on a timer."""
        self._before_scrape.sample = sample

    def set_app_memory(self, current: int | None, limit: int | None) -> None:
        self._app_current.set(math.nan if current is None else float(current))
        self._app_limit.set(math.nan if limit is None else float(limit))

    def set_psi(self, some_avg10: float, full_avg10: float) -> None:
        """Takes the kernel's percentages (0..100), exports ratios (0..1)."""
        self._psi_some.set(float(some_avg10) / 100.0)
        self._psi_full.set(float(full_avg10) / 100.0)

    def kmsg_lost(self, n: int) -> None:
        if n > 0:
            self._lost.inc(n)

    # -------------------------------------------------------------- output

    def render(self) -> bytes:
        """The text exposition format, as served on /metrics."""
        return generate_latest(self.registry)

    def serve(self, listen: str) -> MetricsServer:
        """Serve /metrics on ``listen`` ("127.0.0.1:9464", "[::1]:9464",
        "localhost:9464") in a daemon thread. Only loopback addresses: the
        metrics name processes and users, and the exporter has no auth."""
        host, port = parse_listen(listen)
        return MetricsServer(self.registry, host, port)


class _BeforeScrape(Collector):
    """Exports nothing; runs the sampler each time the registry is collected."""

    def __init__(self) -> None:
        self.sample: Callable[[], None] | None = None

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator:
        if self.sample is not None:
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a scrape must still answer
                log.exception("metrics: sampling before a scrape failed")
        return iter(())


class MetricsServer:
    """A small threaded HTTP server for one registry; ``close`` stops it.
    Its loop blocks on the listening socket and a stop pipe alone:
    ``serve_forever`` would wake every 0.5 s to look for a shutdown."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        handler = MetricsHandler.factory(registry)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class _Server(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True

        self._server = _Server((host, port), handler)
        self.address: tuple[Any, ...] = self._server.server_address
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name="metrics-http", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._server, selectors.EVENT_READ)
            sel.register(self._stop_r, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj == self._stop_r:
                        return
                    self._server.handle_request()  # ready: accepts at once, a thread per request

    @property
    def port(self) -> int:
        return int(self.address[1])

    def close(self) -> None:
        os.write(self._stop_w, b"\0")
        self._thread.join(5)
        self._server.server_close()
        os.close(self._stop_r)
        os.close(self._stop_w)


class TextfileWriter:
    """The registry as a ``.prom`` file for node_exporter's textfile
    collector: rewritten every ``interval`` and as soon as ``wake`` is
    called. Each write is a temp file in the same directory, fsynced and
    renamed over the old one (mode 0644, node_exporter runs as its own
    user), so node_exporter never reads half a file; the temp file's name
    does not end in .prom, so it is never collected either."""

    def __init__(self, registry: CollectorRegistry, path: str, interval: float):
        self.registry = registry
        self.path = path
        self.interval = interval
        self._wake = threading.Event()
        self._last_error: str | None = None

    @classmethod
    def attach(cls, metrics: Metrics, cfg: MetricsConfig) -> TextfileWriter:
        """A writer of ``metrics`` to ``cfg.textfile``, woken by each OOM kill."""
        writer = cls(metrics.registry, cfg.textfile, cfg.textfile_interval)
        metrics.on_oom_kill = writer.wake
        return writer

    def wake(self) -> None:
        self._wake.set()

    def write(self) -> bool:
        """One write; a failure (no such directory, a full disk) is logged
        when it first happens and when it clears, never raised."""
        try:
            text = generate_latest(self.registry).decode()
            statefile.write_text_atomic(self.path, text, mode=0o644, parents=False)
        except OSError as e:
            error = f"{e.strerror or e} ({type(e).__name__})"
            if error != self._last_error:
                log.warning("metrics textfile %s not written: %s", self.path, error)
            self._last_error = error
            return False
        if self._last_error is not None:
            log.info("metrics textfile %s written again", self.path)
            self._last_error = None
        return True

    def run(self, stop: threading.Event) -> None:
        """Until ``stop`` is set (call ``wake`` after setting it to end the
        wait at once); writes once more on the way out."""
        while not stop.is_set():
            self.write()
            self._wake.wait(self.interval)
            self._wake.clear()
        self.write()
