"""Bounded protection, `oom-protect --memory-max SIZE` (issue 11): the client's
option, the request, [protect]'s max and default, the broker's checks, the
placement's clamp and the watch that ends a run livelocked at its budget.
The kernel's side (the livelock, the kill, the shop untouched) is
tests/guest/test_budget_guest.py."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from oomguard import config, protect
from oomguard.broker import Granter, Peer, Refusal, placement
from oomguard.broker.server import _check_protect
from oomguard.config import format_size, parse_size
from oomguard.healer.budget import BudgetWatch, over_budget
from oomguard.host import cgroups, scope
from oomguard.runs.lifecycle import RunRefused
from oomguard.runs.registry import RunRegistry
from oomguard.runs.run import BUDGET, Run, budget_of
from oomguard.telemetry.reasons import RefusalReason

G = 1 << 30
M = 1 << 20


# ---------------------------------------------------------------- the client


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--memory-max", "2G", "php", "x.php"], (["php", "x.php"], False, 2 * G)),
        (["--memory-max=512M", "--report", "--", "-x"], (["-x"], True, 512 * M)),
        (["--report", "--memory-max", "1.5g", "make"], (["make"], True, 3 * G // 2)),
        (["php", "--memory-max", "2G"], (["php", "--memory-max", "2G"], False, None)),  # CMD's own
        (["--memory-max", "2GiB", "x"], (["x"], False, 2 * G)),
    ],
)
def test_the_client_takes_a_budget_before_the_command(argv, expected):
    what, cmd, options = protect.parse_args(["oom-protect", *argv])
    assert (what, cmd, options["report"], options["memory_max"]) == ("run", *expected)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--memory-max"], "needs a size"),
        (["--memory-max", "2X", "php"], "'2X' is not a size like 512M or 2G"),
        (["--memory-max=", "php"], "is not a size"),
        (["--memory-max", "-1G", "php"], "is not a size"),
        (["--memory-max", "512K", "php"], "below the smallest budget, 1M"),
        (["--memory-max", "9" * 30, "php"], "too large"),
        (["--memory-max", "١G", "php"], "is not a size"),  # a non-ASCII digit
        (["--memory-max", "2G"], "no command given"),
        (["--memory-max", "2G", "--help"], "--help goes alone"),
    ],
)
def test_a_bad_budget_is_a_usage_error(argv, message):
    with pytest.raises(ValueError, match=message):
        protect.parse_args(["oom-protect", *argv])


def test_a_bad_budget_exits_125_before_anything_runs(capfd):
    assert protect.main(["oom-protect", "--memory-max", "lots", "true"]) == protect.EXIT_FAILED
    err = capfd.readouterr().err
    assert "'lots' is not a size" in err and "Try 'oom-protect --help'" in err


def test_the_request_is_json_the_broker_reads():
    line = protect.request(report=True, memory_max=3 * G)
    assert line.endswith(b"}\n")
    request = json.loads(line)
    assert request == {"op": "protect", "v": 1, "report": True, "memory_max": 3 * G}
    assert _check_protect(request) == {"report": True, "memory_max": 3 * G}
    assert json.loads(protect.request()) == {"op": "protect", "v": 1}
    assert _check_protect(json.loads(protect.request())) == {"report": False, "memory_max": None}


@pytest.mark.parametrize("value", ["2G", -1, 1024, True, 2.5, None, [1], 1 << 61])
def test_the_broker_refuses_a_malformed_budget(value):
    with pytest.raises(Refusal) as e:
        _check_protect({"op": "protect", "v": 1, "memory_max": value})
    assert e.value.reason == RefusalReason.INVALID and "memory_max" in str(e.value)


@pytest.mark.parametrize("size", [M, 3 * M, 2 * G, 1536 * M, 4097 << 10, 12345678, 5 << 40])
def test_sizes_print_as_they_parse(size):
    assert parse_size(format_size(size)) == size
    assert protect.parse_size(format_size(size)) == size


# ---------------------------------------------------------------- [protect]


def _load(tmp_path, text):
    p = tmp_path / "oomguard.toml"
    p.write_text(text)
    return config.load(p)


def test_max_and_default_budget_parse(tmp_path):
    cfg = _load(tmp_path, '[protect]\nmax_memory_max = "4G"\ndefault_memory_max = "1G"\n').protect
    assert (cfg.max_memory_max, cfg.default_memory_max) == (4 * G, G)
    assert cfg.budget(None) == G  # asked none: the default
    assert cfg.budget(2 * G) == 2 * G
    with pytest.raises(ValueError, match=r"4G \(\[protect\] max_memory_max\)"):
        cfg.budget(5 * G)
    only_max = _load(tmp_path, '[protect]\nmax_memory_max = "4G"\n').protect
    assert only_max.budget(None) == 4 * G  # root requires a budget: every run gets one
    assert config.ProtectConfig().budget(None) is None  # no budget unless asked


@pytest.mark.parametrize(
    "text, key",
    [
        ('[protect]\nmax_memory_max = "lots"\n', "protect.max_memory_max"),
        ('[protect]\ndefault_memory_max = "512K"\n', "protect.default_memory_max"),
        ('[protect]\nmax_memory_max = "1G"\ndefault_memory_max = "2G"\n', "protect.default_memory_max"),
    ],
)
def test_a_bad_budget_setting_names_the_file_and_key(tmp_path, text, key):
    with pytest.raises(config.ConfigError) as e:
        _load(tmp_path, text)
    assert key in str(e.value) and "oomguard.toml" in str(e.value)


def _peer() -> Peer:
    return Peer(pid=os.getpid(), uid=os.getuid(), gid=os.getgid(), groups=(), accepted=0)


def test_a_grant_over_the_most_is_refused_before_anything_is_made(tmp_path):
    cfg = config.ProtectConfig(allow_uids=frozenset({os.getuid()}), max_memory_max=G)
    reg = RunRegistry(tmp_path / "runs.json", "boot")
    refusals = []
    g = Granter(cfg, reg, on_refusal=lambda peer, reason, msg: refusals.append(reason))
    with pytest.raises(Refusal) as e:
        g.grant(_peer(), memory_max=2 * G)
    assert e.value.reason == RefusalReason.LIMIT and "2G is above this host's most, 1G" in str(e.value)
    assert refusals == [RefusalReason.LIMIT] and reg.all() == []


# ---------------------------------------------------------------- placement


def test_a_budget_is_clamped_to_the_callers_limits(monkeypatch):
    monkeypatch.setattr(cgroups, "is_v2", lambda: True)
    monkeypatch.setattr(cgroups, "systemd_booted", lambda: False)
    monkeypatch.setattr(cgroups, "effective_memory_limit", lambda cg: 300 * M)
    assert placement.plan(7, 1, "/app", 2 * G).memory_max == 300 * M
    assert placement.plan(7, 1, "/app", 100 * M).memory_max == 100 * M
    assert placement.plan(7, 1, "/app").memory_max is None


def test_a_budget_without_a_cgroup_is_refused(monkeypatch):
    monkeypatch.setattr(cgroups, "is_v2", lambda: False)
    with pytest.raises(RunRefused, match="needs a cgroup v2 host"):
        placement.plan(7, 1, "/app", G)
    assert placement.plan(7, 1, "/app").caller_cgroup is None  # no budget: a run without a cgroup


def test_a_budgeted_scope_asks_systemd_for_the_limit_and_no_swap():
    argv = scope.scope_argv("oomguard-run-7.scope", 42, "user-1000.slice", "run 7", memory_max=G)
    props = argv[argv.index("fail") + 1:]
    assert props[0] == "5" and props[-1] == "0"
    assert props[props.index("MemoryMax"):][:3] == ["MemoryMax", "t", str(G)]
    assert props[props.index("MemorySwapMax"):][:3] == ["MemorySwapMax", "t", "0"]
    plain = scope.scope_argv("oomguard-run-7.scope", 42, "user-1000.slice", "run 7")
    assert plain[plain.index("fail") + 1] == "3" and "MemoryMax" not in plain


# ---------------------------------------------------------------- the watch


def _run(rid: int, cgroup: str, budget: int | None) -> Run:
    return Run(id=rid, uid=1000, user="app", pid=100 + rid, starttime=5, started=time.time(),
               command="import", cgroup=cgroup, extra={} if budget is None else {BUDGET: budget})  # fmt: skip


def test_a_livelock_in_a_budgeted_runs_own_cgroup_ends_that_run_once(tmp_path):
    reg = RunRegistry(tmp_path / "runs.json", "boot")
    reg.add(_run(1, "/oomguard-run-1", 64 * M))
    reg.add(_run(2, "/app/oomguard-run-2", None))
    release = threading.Event()
    ended = []

    def end(run, reason, why, term_timeout):
        ended.append((run.id, reason, why, term_timeout))
        release.wait(10)

    watch = BudgetWatch(reg, end)
    first = watch.on_livelock("/oomguard-run-1")
    assert first is not None
    # the kernel repeats the message many times a second until the kill lands
    assert watch.on_livelock("/oomguard-run-1") is None
    assert watch.on_livelock("/oomguard-run-2") is None  # protected, but no budget: the grace governs
    assert watch.on_livelock("/app/oomguard-run-2") is None
    assert watch.on_livelock("/oomguard-run-1/inner") is None  # a limit inside the run is not its budget
    assert watch.on_livelock("/app") is None and watch.on_livelock(None) is None
    release.set()
    first.join(10)
    assert ended == [(1, "exceeded its 64M budget", "run 1 exceeded its 64M budget", 0.5)]
    # a kill that left the run alive is tried again at the next message
    again = watch.on_livelock("/oomguard-run-1")
    assert again is not None
    again.join(10)
    assert len(ended) == 2


def test_the_end_reason_names_the_budget():
    assert over_budget(_run(3, "/x", 2 * G)) == "exceeded its 2G budget"
    assert budget_of(_run(3, "/x", None)) is None


def test_the_run_report_says_its_budget_ended_it(tmp_path):
    from oomguard.cli.render import render_run_report
    from oomguard.forensics import runreport
    from oomguard.runs.views import run_view

    run = _run(4, "/app/oomguard-run-4", 48 * M)
    ended = run_view(Run(**{**vars(run), "ended": run.started + 5, "exit_status": -9,
                            "end_reason": over_budget(run)}))  # fmt: skip
    assert ended["memory_max"] == 48 * M
    report = runreport.build(ended, [], [], now=run.started + 10)
    assert report["ended_by"] == "its memory budget (oom-protect --memory-max)"
    text = render_run_report(report)
    assert "budget      48 MiB" in text and "by its memory budget" in text
    assert "budget" not in render_run_report(runreport.build(run_view(_run(5, "/x", None)), [], [], now=time.time()))
