"""Tests for oomguard.metrics and the example alert rules."""

from __future__ import annotations

import math
import random
import re
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from oomguard.config import ConfigError
from oomguard.forensics.metrics import (
    MAX_ACTIONS,
    REFUSAL_REASONS,
    Metrics,
    cgroup_label,
    parse_listen,
)
from oomguard.telemetry.hooks import Hooks
from oomguard.telemetry.reasons import RefusalReason

RULES = Path(__file__).resolve().parents[2] / "contrib" / "prometheus" / "oomguard-rules.yml"


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def kills(m: Metrics) -> dict[tuple[str, str], float]:
    return {
        (dict(labels)["comm"], dict(labels)["cgroup"]): v
        for (name, labels), v in samples(m).items()
        if name == "oomguard_oom_kills_total"
    }


def value(m: Metrics, name: str, **labels: str) -> float:
    return samples(m)[(name, tuple(sorted(labels.items())))]


# ---------------------------------------------------------------- values


def test_every_metric_is_exposed_with_help_and_type() -> None:
    text = Metrics().render().decode()
    for name in [
        "oomguard_oom_kills",
        "oomguard_oom_livelocks",
        "oomguard_oom_livelock",
        "oomguard_protect_grants",
        "oomguard_protect_refusals",
        "oomguard_protected_processes",
        "oomguard_healer_downtime_seconds",
        "oomguard_healer_down",
        "oomguard_healer_tick_seconds",
        "oomguard_healer_oom_kills_per_second",
        "oomguard_healer_livelock",
        "oomguard_healer_actions",
        "oomguard_app_memory_current_bytes",
        "oomguard_app_memory_limit_bytes",
        "oomguard_memory_pressure_some_avg10_ratio",
        "oomguard_memory_pressure_full_avg10_ratio",
        "oomguard_kmsg_lost_records",
        "oomguard_info",
    ]:
        assert re.search(rf"^# HELP {name}(_total)? \S", text, re.M), name
        assert re.search(rf"^# TYPE {name}(_total)? (counter|gauge)$", text, re.M), name
    assert "_created" not in text  # no timestamp series doubling every counter


def test_oom_kills_by_comm_and_cgroup() -> None:
    m = Metrics(top_comms=5)
    m.oom_kill("php-fpm", "/system.slice/php8.2-fpm.service")
    m.oom_kill("php-fpm", "/system.slice/php8.2-fpm.service")
    m.oom_kill("mysqld", "/system.slice/mariadb.service")
    m.oom_kill(None, None)
    assert kills(m) == {
        ("php-fpm", "/system.slice/php8.2-fpm.service"): 2,
        ("mysqld", "/system.slice/mariadb.service"): 1,
        ("unknown", "unknown"): 1,
    }


def test_cgroup_label_keeps_two_levels() -> None:
    assert cgroup_label("/oomguard.app/run-7/worker") == "/oomguard.app/run-7"
    assert cgroup_label("/system.slice/nginx.service") == "/system.slice/nginx.service"
    assert cgroup_label("/") == "/"
    assert cgroup_label(None) == "unknown"


def test_comm_labels_are_bounded_to_the_top_n() -> None:
    m = Metrics(top_comms=2)
    for comm in ["a", "a", "b", "c", "c"]:
        m.oom_kill(comm, "/x")
    assert kills(m) == {("a", "/x"): 2, ("b", "/x"): 1, ("other", "/x"): 2}
    # c reaches twice b's count plus one: c gets a label from this kill on,
    # b stops being exported, nothing is counted twice.
    m.oom_kill("c", "/x")
    assert kills(m) == {("a", "/x"): 2, ("c", "/x"): 1, ("other", "/x"): 2}
    m.oom_kill("b", "/x")  # b (2) is far from beating c (3): other
    assert kills(m)[("other", "/x")] == 3
    assert sum(kills(m).values()) == 7 - 1  # 7 kills; the dropped series of b held one


def test_labels_stay_bounded_and_stable_under_a_flood_of_names() -> None:
    m = Metrics(top_comms=3)
    rnd = random.Random(3)
    previous: dict[tuple[str, str], float] = {}
    ever: set[tuple[str, str]] = set()
    for i in range(1500):
        comm = "hog" if i % 3 == 0 else f"c{rnd.randrange(2000)}"
        m.oom_kill(comm, f"/user.slice/run-{rnd.randrange(500)}/x")
        now = kills(m)
        for key, v in now.items():
            if key in previous:  # monotonic while a series exists
                assert v >= previous[key]
        previous = now
        ever |= set(now)
        assert len({c for c, _ in now}) <= 4 and len({g for _, g in now}) <= 4
    # Few series over the whole run, not one per name: labels rarely change hands.
    assert len(ever) <= 40, len(ever)
    assert any(c == "hog" for c, _ in previous)  # the frequent one keeps its label


def test_refusal_reasons_are_a_fixed_set() -> None:
    m = Metrics()
    for reason in REFUSAL_REASONS:
        assert value(m, "oomguard_protect_refusals_total", reason=reason) == 0
    m.refusal("not_allowed")
    m.refusal(RefusalReason.GONE)
    m.refusal("made up by a client")  # counted as the catch-all member, never as a new label
    assert value(m, "oomguard_protect_refusals_total", reason="not_allowed") == 1
    assert value(m, "oomguard_protect_refusals_total", reason="gone") == 1
    assert value(m, "oomguard_protect_refusals_total", reason="refused") == 1
    assert {
        dict(k[1]).get("reason") for k in samples(m) if k[0] == "oomguard_protect_refusals_total"
    } == set(REFUSAL_REASONS)
    # the label values are the broker's enum: all its members, nothing else
    assert set(REFUSAL_REASONS) == {r.value for r in RefusalReason}


def test_healer_actions_are_bounded() -> None:
    m = Metrics()
    for i in range(MAX_ACTIONS + 5):
        m.healer_action(f"action_{i}")
    m.healer_action("Not A Name!")
    m.healer_action("restart")
    names = {dict(k[1])["action"] for k in samples(m) if k[0] == "oomguard_healer_actions_total"}
    assert len(names) == MAX_ACTIONS + 1 and "other" in names
    assert value(m, "oomguard_healer_actions_total", action="other") == 7


def test_gauges() -> None:
    m = Metrics()
    assert math.isnan(value(m, "oomguard_app_memory_current_bytes"))
    m.grant()
    m.grant()
    m.set_protected(3)
    m.set_downtime(42.5)
    m.set_livelock(True)
    m.oom_livelock()
    m.set_app_memory(512 << 20, 1 << 30)
    m.set_psi(12.5, 3.0)
    m.kmsg_lost(7)
    assert value(m, "oomguard_protect_grants_total") == 2
    assert value(m, "oomguard_protected_processes") == 3
    assert value(m, "oomguard_healer_downtime_seconds") == 42.5
    assert value(m, "oomguard_oom_livelock") == 1
    assert value(m, "oomguard_oom_livelocks_total") == 1
    assert value(m, "oomguard_app_memory_current_bytes") == 512 << 20
    assert value(m, "oomguard_app_memory_limit_bytes") == 1 << 30
    assert value(m, "oomguard_memory_pressure_some_avg10_ratio") == pytest.approx(0.125)
    assert value(m, "oomguard_memory_pressure_full_avg10_ratio") == pytest.approx(0.03)
    assert value(m, "oomguard_kmsg_lost_records_total") == 7
    m.set_livelock(False)
    m.set_app_memory(None, None)
    assert value(m, "oomguard_oom_livelock") == 0
    assert math.isnan(value(m, "oomguard_app_memory_limit_bytes"))


def test_metrics_implements_every_hook() -> None:
    assert isinstance(Metrics(), Hooks)
    hooks = {n for n in vars(Hooks) if not n.startswith("_")}
    assert hooks and all(callable(getattr(Metrics, n, None)) for n in hooks)
    # each one overridden by Metrics itself, not inherited as a no-op
    assert hooks <= set(vars(Metrics)), hooks - set(vars(Metrics))


def test_instances_do_not_share_a_registry() -> None:
    a, b = Metrics(), Metrics()
    a.grant()
    a.oom_kill("x", "/")
    assert value(b, "oomguard_protect_grants_total") == 0 and kills(b) == {}


# ---------------------------------------------------------------- serving


@pytest.mark.parametrize(
    "listen",
    [
        "0.0.0.0:9464",
        "192.168.1.10:9464",
        "[::]:9464",
        "8.8.8.8:1",
        ":9464",
        "127.0.0.1",
        "127.0.0.1:99999",
    ],
)
def test_serve_refuses_non_loopback_and_malformed(listen: str) -> None:
    with pytest.raises(ConfigError, match="metrics.listen"):
        parse_listen(listen)


def test_serve_refuses_names_that_do_not_resolve_to_loopback() -> None:
    with pytest.raises(ConfigError, match="metrics.listen"):
        parse_listen("name.invalid:9464")


def test_parse_listen_accepts_loopback() -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("127.0.0.2:1") == ("127.0.0.2", 1)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    assert parse_listen("localhost:9464") == ("localhost", 9464)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback test server
        return r.read()


def test_serve_on_loopback_and_close() -> None:
    m = Metrics()
    m.oom_kill("php-fpm", "/system.slice/php.service")
    server = m.serve("127.0.0.1:0")
    try:
        body = _get(f"http://127.0.0.1:{server.port}/metrics").decode()
        assert (
            'oomguard_oom_kills_total{cgroup="/system.slice/php.service",comm="php-fpm"} 1.0'
            in body
        )
        m.grant()
        assert (
            "oomguard_protect_grants_total 1.0"
            in _get(f"http://127.0.0.1:{server.port}/metrics").decode()
        )
    finally:
        server.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_serve_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python build")
    try:
        server = Metrics().serve("[::1]:0")
    except OSError as e:  # e.g. IPv6 disabled in this network namespace
        pytest.skip(f"cannot bind ::1 here: {e}")
    try:
        assert b"oomguard_info" in _get(f"http://[::1]:{server.port}/metrics")
    finally:
        server.close()


# ---------------------------------------------------------------- alert rules


def _rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_rules_structure() -> None:
    """The rules file as Prometheus expects it, checked with a real YAML
    parser whether or not promtool is installed."""
    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"}
    names = set()
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["name"]
        assert group["name"] not in names
        names.add(group["name"])
        alerts = set()
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"])
            assert rule["alert"] not in alerts
            alerts.add(rule["alert"])
            expr = rule["expr"]
            assert isinstance(expr, str) and expr.strip()
            assert expr.count("(") == expr.count(")") and expr.count("[") == expr.count("]")
            if "for" in rule:
                assert re.fullmatch(r"\d+[smhd]", rule["for"])
            assert rule["labels"]["severity"] in {"info", "warning", "critical"}
            assert {"summary", "description"} <= set(rule["annotations"])
            for text in rule["annotations"].values():
                assert text.count("{{") == text.count("}}")


def test_rules_use_only_metrics_that_exist() -> None:
    m = Metrics()
    m.oom_kill("x", "/")  # the custom collector has samples only after a kill
    exposed = {
        s.name for fam in text_string_to_metric_families(m.render().decode()) for s in fam.samples
    }
    used = set()
    for rule in _rules():
        used |= set(re.findall(r"\boomguard_[a-z0-9_]+", rule["expr"]))
    assert used, "no oomguard metric in the rules"
    assert used <= exposed, used - exposed


PROMTOOL = shutil.which("promtool")
PROMTOOL_MISSING = (
    "promtool is not installed (Debian: apt-get install prometheus); "
    "test_rules_structure validated the file with a YAML parser instead"
)


@pytest.mark.skipif(PROMTOOL is None, reason=PROMTOOL_MISSING)
def test_promtool_check_rules() -> None:
    out = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in out.stdout


PROMTOOL_TEST = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'oomguard_oom_kills_total{{instance="h1",comm="php-fpm",cgroup="/system.slice/php.service"}}'
        values: '0 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1'
      - series: 'oomguard_oom_livelock{{instance="h1"}}'
        values: '0 0 1 1 1 1 0 0'
      - series: 'oomguard_app_memory_current_bytes{{instance="h1"}}'
        values: '990x30'
      - series: 'oomguard_app_memory_limit_bytes{{instance="h1"}}'
        values: '1000x30'
      - series: 'oomguard_memory_pressure_full_avg10_ratio{{instance="h1"}}'
        values: '0.5x3 0.01x10'
    alert_rule_test:
      - eval_time: 5m
        alertname: OomguardOomKill
        exp_alerts:
          - exp_labels: {{severity: warning, instance: h1, comm: php-fpm, cgroup: /system.slice/php.service}}
            exp_annotations:
              runbook_url: "file:///usr/share/doc/oomguard/runbook.md#oomguardoomkill"
              summary: "OOM killer killed php-fpm in /system.slice/php.service on h1"
              description: "The kernel OOM killer killed 1 process(es) named php-fpm in the last 10 minutes. Run `oomguard events --since 1h` on the host to see the victims and the protected runs alive at the time."
      - eval_time: 20m
        alertname: OomguardOomKill
        exp_alerts: []
      - eval_time: 5m
        alertname: OomguardOomKillStorm
        exp_alerts: []
      - eval_time: 2m
        alertname: OomguardOomLivelock
        exp_alerts: []
      - eval_time: 4m
        alertname: OomguardOomLivelock
        exp_alerts:
          - exp_labels: {{severity: critical, instance: h1}}
            exp_annotations:
              runbook_url: "file:///usr/share/doc/oomguard/runbook.md#oomguardoomlivelock"
              summary: "OOM with nothing killable on h1"
              description: "The kernel keeps reporting \\"Out of memory and no killable processes\\": every candidate is protected (oom_score_adj -1000). The affected cgroup is stuck until memory is freed or a protection is lifted."
      - eval_time: 9m
        alertname: OomguardOomLivelock
        exp_alerts: []
      - eval_time: 5m
        alertname: OomguardAppMemoryNearLimit
        exp_alerts: []
      - eval_time: 12m
        alertname: OomguardAppMemoryNearLimit
        exp_alerts:
          - exp_labels: {{severity: warning, instance: h1}}
            exp_annotations:
              runbook_url: "file:///usr/share/doc/oomguard/runbook.md#oomguardappmemorynearlimit"
              summary: "App slice at 99% of its memory limit on h1"
              description: "The app slice has used more than 95% of its memory limit for 10 minutes; the next allocation spike ends in an OOM kill inside it."
      - eval_time: 8m
        alertname: OomguardMemoryPressure
        exp_alerts: []
"""


@pytest.mark.skipif(PROMTOOL is None, reason=PROMTOOL_MISSING)
def test_promtool_rules_fire_when_they_should(tmp_path: Path) -> None:
    spec = tmp_path / "rules-test.yml"
    spec.write_text(PROMTOOL_TEST.format(rules=RULES))
    out = subprocess.run(
        [PROMTOOL, "test", "rules", str(spec)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
