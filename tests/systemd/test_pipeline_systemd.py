"""The fleet's pipeline, for real: oomguard's textfile, Debian's
prometheus-node-exporter and prometheus, all on loopback in the systemd guest.

oomguard.service (installed by `oomguard setup`, exporter port off) writes
[metrics] textfile into node_exporter's textfile collector directory;
node_exporter serves it; Prometheus scrapes it every second and evaluates
the shipped contrib/prometheus/oomguard-rules.yml every second. A real kernel
OOM kill (a hog in a 48M transient unit in the app slice) must reach the
file, node_exporter, Prometheus and fire OomguardOomKill in /api/v1/alerts;
the textfile-to-alert latency is printed. Then every query of the shipped
Grafana dashboard must parse and return series from this Prometheus.
Every wait is on a condition, with a generous deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from systemd_tools import run, setup_installed, systemctl, unit_property, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
import grafana_dashboard  # noqa: E402  (tests/unit: the dashboard's variables, filled)

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "contrib" / "prometheus" / "oomguard-rules.yml"
CONFIG = Path("/etc/oomguard/oomguard.toml")
COLLECTOR_DIR = Path("/var/lib/prometheus/node-exporter")  # Debian's textfile collector dir
TEXTFILE = COLLECTOR_DIR / "oomguard.prom"
NODE = "127.0.0.1:9100"
PROM = "127.0.0.1:9090"
HOG_UNIT = "fleet-hog.service"  # not oomguard-*: the default policy makes those -1000
HOG_COMM = "fleet-hog"
APP_SLICE = "oomguard-app.slice"
HOG_LABELS = {"comm": HOG_COMM, "cgroup": f"/oomguard.slice/{APP_SLICE}"}
DEADLINE = 180  # TCG is slow; every wait ends on its condition first


def get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def reachable(url: str) -> bytes | None:
    try:
        return get(url)
    except OSError:
        return None


def prom_api(path: str, **params: str) -> dict:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    try:
        body = get(f"http://{PROM}/api/v1/{path}{query}")
    except urllib.error.HTTPError as e:  # a bad query: 400 with the parser's error
        body = e.read()
    return json.loads(body)


def query(expr: str) -> list[dict]:
    answer = prom_api("query", query=expr)
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def hog_kills(text: str) -> float | None:
    """The hog's oomguard_oom_kills_total in an exposition (oomguard's, or
    node_exporter's, which writes the same sample as "1", not "1.0")."""
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "oomguard_oom_kills_total" and s.labels == HOG_LABELS:
                return s.value
    return None


def start(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Iterator[Path]:
    """oomguard.service writing the textfile, node_exporter and Prometheus."""
    work = tmp_path_factory.mktemp("pipeline")
    saved = CONFIG.read_bytes() if CONFIG.exists() else None
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    CONFIG.write_text(f'[metrics]\nlisten = ""\ntextfile = "{TEXTFILE}"\n')
    (work / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES}\n"
        f"scrape_configs:\n  - job_name: node\n    static_configs:\n      - targets: ['{NODE}']\n"
    )
    procs: list[subprocess.Popen] = []
    try:
        with setup_installed():
            procs.append(start([
                "/usr/bin/prometheus-node-exporter", f"--web.listen-address={NODE}",
                "--collector.disable-defaults", "--collector.textfile", "--collector.vmstat",
                f"--collector.textfile.directory={COLLECTOR_DIR}",
            ], work / "node-exporter.log"))  # fmt: skip
            procs.append(start([
                "/usr/bin/prometheus", f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address={PROM}",
            ], work / "prometheus.log"))  # fmt: skip
            yield work
    finally:
        for proc in procs:
            stop(proc)
        systemctl("stop", HOG_UNIT, check=False)
        systemctl("reset-failed", HOG_UNIT, check=False)
        TEXTFILE.unlink(missing_ok=True)
        if saved is None:
            CONFIG.unlink(missing_ok=True)
        else:
            CONFIG.write_bytes(saved)
        for log in ("node-exporter.log", "prometheus.log"):
            if (work / log).exists() and os.environ.get("OOMGUARD_GUEST_RESULTS"):
                shutil.copy(work / log, Path(os.environ["OOMGUARD_GUEST_RESULTS"]) / log)


def test_a_real_oom_kill_goes_from_the_textfile_through_node_exporter_to_a_firing_alert(pipeline):
    # The daemon writes the file with its port off; node_exporter serves it.
    assert unit_property("oomguard.service", "ActiveState") == "active"
    wait_until(lambda: TEXTFILE.exists() and "oomguard_info" in TEXTFILE.read_text(), "the textfile", DEADLINE)
    assert oct(TEXTFILE.stat().st_mode & 0o777) == "0o644"
    served = wait_until(lambda: reachable(f"http://{NODE}/metrics"), "node_exporter", DEADLINE).decode()
    assert "oomguard_info{" in served and "node_textfile_scrape_error 0" in served, served[-2000:]
    assert reachable("http://127.0.0.1:9464/metrics") is None  # listen = "": no port of its own

    # Prometheus has scraped oomguard for a while: the rule tells a new victim from an old one.
    wait_until(lambda: reachable(f"http://{PROM}/-/ready"), "Prometheus ready", DEADLINE)
    wait_until(lambda: query("count_over_time(oomguard_info[1m]) >= 5"), "5 scrapes of oomguard_info", DEADLINE)
    assert not query(f'oomguard_oom_kills_total{{comm="{HOG_COMM}"}}')
    rules = prom_api("rules")["data"]["groups"]
    assert {r["name"] for g in rules for r in g["rules"]} >= {"OomguardOomKill", "OomguardOomLivelock"}

    # A real kernel OOM kill: the hog's unit has 48M, the hog wants 1 GiB.
    hog = (
        f"open('/proc/self/comm', 'w').write('{HOG_COMM}'); "
        "chunks = [bytearray(1 << 20) for _ in range(1024)]"
    )
    run(["systemd-run", f"--unit={HOG_UNIT}", f"--slice={APP_SLICE}", "-p", "MemoryMax=48M",
         "-p", "MemorySwapMax=0", "--quiet", "/usr/bin/python3", "-c", hog])  # fmt: skip
    def textfile_with_the_kill() -> float | None:
        """The mtime of the first version that carries the kill (read and
        stat through one fd: the same version)."""
        with open(TEXTFILE, "rb") as f:
            mtime = os.fstat(f.fileno()).st_mtime
            return mtime if hog_kills(f.read().decode()) == 1 else None

    written = wait_until(textfile_with_the_kill, "the kill in the textfile", DEADLINE)
    assert unit_property(HOG_UNIT, "Result") == "oom-kill"

    def firing() -> dict | None:
        for alert in prom_api("alerts")["data"]["alerts"]:
            labels = alert["labels"]
            if labels["alertname"] == "OomguardOomKill" and labels.get("comm") == HOG_COMM:
                if alert["state"] == "firing":
                    return alert
        return None

    served = lambda: hog_kills((reachable(f"http://{NODE}/metrics") or b"").decode())  # noqa: E731
    wait_until(lambda: served() == 1, "node_exporter serving the kill", DEADLINE)
    alert = wait_until(firing, "OomguardOomKill firing in /api/v1/alerts", DEADLINE)
    seen = time.time()
    active_at = datetime.fromisoformat(alert["activeAt"].replace("Z", "+00:00")).timestamp()
    assert alert["labels"]["cgroup"] == f"/oomguard.slice/{APP_SLICE}"
    assert alert["labels"]["severity"] == "warning" and alert["labels"]["instance"] == NODE
    assert alert["annotations"]["runbook_url"] == "file:///usr/share/doc/oomguard/runbook.md#oomguardoomkill"
    assert float(alert["value"]) >= 1
    print(
        f"\nFIGURE textfile-to-alert latency: {seen - written:.2f} s to firing in /api/v1/alerts "
        f"(alert activeAt {active_at - written:.2f} s after the textfile write; "
        "scrape and evaluation every 1 s, under TCG)"
    )
    figures = os.environ.get("OOMGUARD_GUEST_RESULTS")
    if figures:
        with open(Path(figures) / "figures.txt", "a") as f:
            f.write(f"textfile_to_alert_seconds {seen - written:.2f}\ntextfile_to_active_at_seconds {active_at - written:.2f}\n")


def test_every_dashboard_panel_query_parses_and_returns_series(pipeline):
    """Run after the kill above (the kill panels need it), against the same Prometheus."""
    instances = prom_api("label/instance/values", **{"match[]": "oomguard_info"})["data"]
    assert instances == [NODE]  # the dashboard's $instance variable: label_values(oomguard_info, instance)
    queries = grafana_dashboard.queries(grafana_dashboard.load(), instance=NODE)
    assert len(queries) >= 10
    for title, expr in queries:
        answer = prom_api("query", query=expr)
        assert answer["status"] == "success", (title, expr, answer.get("error"))
        result = wait_until(lambda e=expr: query(e), f"series for {title!r}: {expr}", DEADLINE)
        assert all("value" in r for r in result), (title, result)
    # the check can fail: a query of a metric nobody exports returns nothing
    assert query('oomguard_no_such_metric{instance=~".+"}') == []
