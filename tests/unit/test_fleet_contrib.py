"""What a fleet takes from contrib/: the alert rules' runbook links, the
Grafana dashboard and the Ansible role, checked as files and with the real
tools (promtool, ansible-playbook) where they are installed. The live checks
(the rules firing, each panel returning series, the role run twice) are in
tests/systemd/test_pipeline_systemd.py and test_ansible_systemd.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import grafana_dashboard
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from oomguard.forensics.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "contrib" / "prometheus" / "oomguard-rules.yml"
RUNBOOK = REPO / "docs" / "runbook.md"
RUNBOOK_URL = "file:///usr/share/doc/oomguard/runbook.md#"
PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = "promtool is not installed (Debian: apt-get install prometheus)"


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def github_anchor(heading: str) -> str:
    """The id GitHub (and most Markdown renderers) give a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def exposed_metric_names() -> set[str]:
    m = Metrics()
    m.oom_kill("x", "/")  # the kills collector has samples only after a kill
    return {s.name for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}


# --------------------------------------------------------------- alert rules


def test_every_rule_links_its_own_runbook_section():
    anchors = {
        github_anchor(line[3:]) for line in RUNBOOK.read_text().splitlines() if line.startswith("## ")
    }
    for rule in rules():
        url = rule["annotations"]["runbook_url"]
        assert url == RUNBOOK_URL + rule["alert"].lower(), rule["alert"]
        assert url.removeprefix(RUNBOOK_URL) in anchors, (rule["alert"], sorted(anchors))


def test_github_anchor_matches_githubs_rules():
    assert github_anchor("OomguardOomKill") == "oomguardoomkill"
    assert github_anchor("Inhibiting node_exporter's generic alert") == "inhibiting-node_exporters-generic-alert"


NEW_SERIES_TEST = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # scraped from minute 0; the first kill of "hog" appears at 4m, at 1 (_x4: 4 gaps)
      - series: 'oomguard_info{{instance="h1",job="node",version="0.1.0"}}'
        values: '1x30'
      - series: 'oomguard_oom_kills_total{{instance="h1",job="node",comm="hog",cgroup="/oomguard.app"}}'
        values: '_x4 1x25'
      # a kill from before Prometheus began scraping h2: no alert
      - series: 'oomguard_info{{instance="h2",job="node",version="0.1.0"}}'
        values: '1x30'
      - series: 'oomguard_oom_kills_total{{instance="h2",job="node",comm="old",cgroup="/"}}'
        values: '3x30'
    alert_rule_test:
      - eval_time: 3m
        alertname: OomguardOomKill
        exp_alerts: []
      - eval_time: 5m
        alertname: OomguardOomKill
        exp_alerts:
          - exp_labels: {{severity: warning, instance: h1, comm: hog, cgroup: /oomguard.app}}
            exp_annotations:
              runbook_url: "file:///usr/share/doc/oomguard/runbook.md#oomguardoomkill"
              summary: "OOM killer killed hog in /oomguard.app on h1"
              description: "The kernel OOM killer killed 1 process(es) named hog in the last 10 minutes. Run `oomguard events --since 1h` on the host to see the victims and the protected runs alive at the time."
      - eval_time: 20m
        alertname: OomguardOomKill
        exp_alerts: []
"""


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_a_victims_first_kill_fires_though_its_series_starts_at_one(tmp_path):
    """The exporter creates a victim's series at its first kill, with value 1:
    increase() over it is 0, so the rule must see a series born in the window."""
    spec = tmp_path / "new-series.yml"
    spec.write_text(NEW_SERIES_TEST.format(rules=RULES))
    out = subprocess.run([PROMTOOL, "test", "rules", str(spec)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------- the dashboard

# What each panel must show: words in its title, metrics its queries use.
PANELS = {
    "OOM kills by victim": ({"oomguard_oom_kills_total"}, "by (comm)"),
    "OOM kills by cgroup": ({"oomguard_oom_kills_total"}, "by (cgroup)"),
    "Protected processes": ({"oomguard_protected_processes"}, ""),
    "Healer downtime against grace": ({"oomguard_healer_downtime_seconds"}, "$grace"),
    "App-slice memory against its limit": (
        {"oomguard_app_memory_current_bytes", "oomguard_app_memory_limit_bytes"}, ""),
    "Memory pressure (PSI avg10)": (
        {"oomguard_memory_pressure_some_avg10_ratio", "oomguard_memory_pressure_full_avg10_ratio"}, ""),
    "Protect grants and refusals": (
        {"oomguard_protect_grants_total", "oomguard_protect_refusals_total"}, "by (reason)"),
}  # fmt: skip


def test_the_dashboard_has_a_datasource_variable_and_every_panel_uses_it():
    dash = grafana_dashboard.load()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] == "oomguard"
    for panel in dash["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_dashboard_has_the_panels_a_fleet_needs_on_metrics_that_exist():
    dash = grafana_dashboard.load()
    by_title = {p["title"]: p for p in dash["panels"]}
    exposed = exposed_metric_names()
    for title, (metrics, needle) in PANELS.items():
        exprs = " ".join(t["expr"] for t in by_title[title]["targets"])
        assert metrics <= set(re.findall(r"\boomguard_\w+", exprs)), title
        assert needle in exprs, (title, needle)
    used = {name for p in dash["panels"] for t in p["targets"] for name in re.findall(r"\boomguard_\w+", t["expr"])}
    assert used <= exposed, used - exposed


def test_no_panel_query_is_left_with_a_variable_grafana_would_not_fill():
    for title, expr in grafana_dashboard.queries(grafana_dashboard.load()):
        assert "$" not in expr, (title, expr)
    with pytest.raises(KeyError, match=r"\$nosuch"):
        grafana_dashboard.queries({"panels": [{"title": "t", "targets": [{"expr": "up{x=\"$nosuch\"}"}]}]})


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_every_panel_query_parses_as_promql(tmp_path):
    """promtool parses each query as a recording rule's expression."""
    queries = grafana_dashboard.queries(grafana_dashboard.load())
    records = [{"record": f"oomguard:panel_{i}", "expr": expr} for i, (_title, expr) in enumerate(queries)]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": records}]}))
    out = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(records)} rules found" in out.stdout
    bad = path.with_name("bad.yml")  # the check can fail
    bad.write_text(yaml.safe_dump({"groups": [{"name": "p", "rules": [{"record": "x:y", "expr": "sum by (a (b)"}]}]}))
    assert subprocess.run([PROMTOOL, "check", "rules", str(bad)], capture_output=True, timeout=60).returncode != 0
