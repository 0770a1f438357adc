"""What a fleet takes from contrib/: the alert rules' runbook links, the
Grafana dashboard and the Ansible role, checked as files and with the real
tools (promtool, ansible-playbook) where they are installed. The live checks
(the rules firing, each panel returning series, the role run twice) are in
tests/systemd/test_pipeline_systemd.py and test_ansible_systemd.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
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


# --------------------------------------------------------------- the Ansible role

ANSIBLE = REPO / "contrib" / "ansible"
ROLE = ANSIBLE / "roles" / "oomguard"
ANSIBLE_PLAYBOOK = shutil.which("ansible-playbook")
NO_ANSIBLE = "ansible-playbook is not installed (Debian: apt-get install ansible-core)"


def ansible(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
           "ANSIBLE_HOME": str(tmp_path / "home"), "ANSIBLE_ROLES_PATH": str(ANSIBLE / "roles")}  # fmt: skip
    return subprocess.run(
        [ANSIBLE_PLAYBOOK, "-c", "local", "-i", "localhost,", "-e", "ansible_python_interpreter=/usr/bin/python3",
         *args], capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def test_the_role_has_tasks_handlers_defaults_and_templates_that_fit_together():
    tasks = yaml.safe_load((ROLE / "tasks" / "main.yml").read_text())
    handlers = yaml.safe_load((ROLE / "handlers" / "main.yml").read_text())
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    assert all(t.get("name") for t in tasks + handlers)
    handler_names = {h["name"] for h in handlers}
    assert {t["notify"] for t in tasks if "notify" in t} == handler_names == {"Reload oomguard"}
    assert handlers[0]["ansible.builtin.systemd"] == {"name": "oomguard.service", "state": "reloaded"}
    by_name = {t["name"]: t for t in tasks}
    assert by_name["Install the oomguard package from a .deb"]["ansible.builtin.apt"] == {"deb": "{{ oomguard_deb }}"}
    setup = by_name["Run oomguard setup"]
    assert setup["changed_when"] == "'nothing changed' not in oomguard_setup_result.stdout"
    for t in tasks:  # every file is checked by oomguard before it replaces the old one
        if "ansible.builtin.template" in t:
            assert t["ansible.builtin.template"]["validate"] == "{{ oomguard_bin }} config check %s"
            assert (ROLE / "templates" / t["ansible.builtin.template"]["src"]).is_file()
    used = set(re.findall(r"\boomguard_[a-z_]+", (ROLE / "tasks" / "main.yml").read_text()))
    assert used - {"oomguard_setup_result", "oomguard_toml", "oomguard_toml_what"} <= set(defaults)


@pytest.mark.skipif(ANSIBLE_PLAYBOOK is None, reason=NO_ANSIBLE)
def test_the_example_play_and_the_role_pass_ansibles_syntax_check(tmp_path):
    out = ansible(tmp_path, "--syntax-check", str(ANSIBLE / "site.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


TOML_CASES = {
    "base": {
        "metrics": {"listen": "", "textfile": "/var/lib/prometheus/node-exporter/oomguard.prom", "top_comms": 5},
        "protect": {"allow_users": ["root", "nobody"], "run_cgroups": False, "max_runs_per_uid": 8},
        "healer": {"grace": "3m", "dry_run": True,
                   "window": [{"from": "23:00", "to": "07:00", "grace": "15m"}],
                   "check": [{"name": "shop", "http": "http://127.0.0.1/", "interval": "5s"}],
                   "service": [{"name": "php-fpm", "restart": "systemctl restart php8.2-fpm"}]},
        "notify": {"webhook": [{"url": "https://hooks.example.com/o", "headers": {"Authorization": "Bearer \"x\""}}]},
    },
    "empty": {},
}  # fmt: skip


@pytest.mark.skipif(ANSIBLE_PLAYBOOK is None, reason=NO_ANSIBLE)
def test_the_config_template_renders_the_variables_as_toml_that_oomguard_accepts(tmp_path, bin_path):
    """The role's template, rendered by Ansible itself, reads back as the
    variables it was given and passes `oomguard config check`."""
    book = tmp_path / "render.yml"
    book.write_text(yaml.safe_dump([{"hosts": "localhost", "gather_facts": False, "tasks": [
        {"ansible.builtin.template": {"src": str(ROLE / "templates" / "oomguard.toml.j2"),
                                      "dest": str(tmp_path / f"{name}.toml")},
         "vars": {"oomguard_toml": data, "oomguard_toml_what": "a test"}}
        for name, data in TOML_CASES.items()]}]))  # fmt: skip
    out = ansible(tmp_path, str(book))
    assert out.returncode == 0, out.stdout + out.stderr
    for name, data in TOML_CASES.items():
        text = (tmp_path / f"{name}.toml").read_text()
        assert tomllib.loads(text) == data, text
        check = subprocess.run([bin_path / "oomguard", "config", "check", str(tmp_path / f"{name}.toml")],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
