"""Policy: matching, the forgery attacks, inherited grants, protected runs,
and writes to real (own) child processes.

Tests that write only ever touch processes they spawned: the classes they
use match a comm ("oomgtest-*") that only the test's copies of sleep have.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oomguard.config import (
    Config,
    ConfigError,
    LayoutConfig,
    PolicyConfig,
    parse,
    parse_policy_class,
)
from oomguard.host import cgroups, procfs
from oomguard.policy import rules as policy
from oomguard.policy import writes as policy_writes
from oomguard.policy.enforcer import Enforcer
from oomguard.runs.registry import RunRegistry
from oomguard.runs.run import Run

ROOT, NOBODY = 0, pwd.getpwnam("nobody").pw_uid
HAS_MYSQL = policy._user_exists("mysql")
MYSQL = pwd.getpwnam("mysql").pw_uid if HAS_MYSQL else 9999
WWW = pwd.getpwnam("www-data").pw_uid


def P(pid, *, ppid=1, comm="x", uid=0, start=None, adj=0, exe="/usr/bin/x", cgroup="/", state="S"):
    return procfs.Proc(pid=pid, ppid=ppid, comm=comm, state=state, uid=uid,
                       starttime=pid * 10 if start is None else start, rss_kb=1000,
                       oom_score_adj=adj, oom_score=0, exe=exe, cgroup=cgroup, tty_nr=0)


def app_config(user: str = "nobody") -> Config:
    return parse({"layout": {"app_user": user}})


@pytest.fixture
def classes():
    return policy.default_classes(app_config())


def by_pid(decisions):
    return {d.pid: d for d in decisions}


INIT = P(1, ppid=0, comm="init", exe="/sbin/init")


# ---------------------------------------------------------------- defaults


def test_defaults_parse_and_keep_their_order(classes):
    names = [c.name for c in classes]
    assert names[:4] == ["php-fpm-worker", "nginx-worker", "php-fpm-master", "nginx-master"]
    assert names[-3:] == ["app-ssh", "app-cron", "app-user"]
    assert names.index("oomguard") < names.index("root-automation") < names.index("app-ssh")
    for c in classes:
        if c.privileged:
            assert c.user and (c.exe or c.unit or c.cgroup), c.name
    adj = {c.name: c.oom_score_adj for c in classes}
    assert adj["app-user"] == adj["app-ssh"] == adj["app-cron"] == 1000
    assert adj["php-fpm-master"] < 0 and adj["nginx-master"] < 0
    assert adj["php-fpm-worker"] >= 0 and adj["nginx-worker"] >= 0
    assert adj["root-automation"] == adj["oomguard"] == -1000
    nonessential = {c.name for c in classes if not c.essential}
    assert nonessential == {"php-fpm-worker", "app-ssh", "app-cron", "app-user"}


@pytest.mark.skipif(not HAS_MYSQL, reason="no mysql user on this host")
def test_database_defaults_need_the_mysql_user(classes):
    db = {c.name: c for c in classes}
    assert db["database"].oom_score_adj == -1000
    assert db["database"].user == (MYSQL,)
    assert set(db["database"].exe) == {"/usr/sbin/mariadbd", "/usr/sbin/mysqld"}
    assert set(db["database-unit"].unit) == {"mariadb.service", "mysql.service"}


def test_missing_users_make_their_classes_match_nothing(monkeypatch):
    assert not policy._user_exists("no-such-user-oomg")
    names = [c.name for c in policy.default_classes(parse({}).__class__(
        layout=LayoutConfig(app_user="no-such-user-oomg")))]
    assert not any(n.startswith("app-") for n in names)
    monkeypatch.setattr(policy, "_user_exists", lambda name: name.isdigit())
    names = [c.name for c in policy.default_classes()]
    assert "database" not in names and "app-user" not in names
    assert "root-automation" in names
    # and the remaining classes still classify
    d = policy.plan([INIT, P(50, comm="mariadbd", uid=MYSQL, exe="/usr/sbin/mariadbd")],
                    policy.default_classes(), None)
    assert by_pid(d)[50].class_name is None


def test_root_is_never_the_app_user():
    names = [c.name for c in policy.default_classes(Config(layout=LayoutConfig(app_user="root")))]
    assert not any(n.startswith("app-") for n in names)


def test_classes_for_prefers_the_config():
    cfg = parse({"policy": {"class": [{"name": "x", "oom_score_adj": 5, "comm": ["x"]}]}})
    assert [c.name for c in policy.classes_for(cfg)] == ["x"]
    assert policy.classes_for(Config(policy=PolicyConfig())) == policy.default_classes()


# ---------------------------------------------------------------- the forgery attacks


@pytest.mark.skipif(not HAS_MYSQL, reason="no mysql user on this host")
@pytest.mark.parametrize(
    "proc",
    [
        # renamed process: comm mysqld, the user's own binary
        P(60, comm="mysqld", uid=NOBODY, exe="/home/app/bin/mysqld"),
        P(61, comm="mariadbd", uid=NOBODY, exe="/tmp/mariadbd"),
        # the user's own run of the system binary
        P(62, comm="mariadbd", uid=NOBODY, exe="/usr/sbin/mariadbd"),
        # a copy of the binary, even run as mysql
        P(63, comm="mariadbd", uid=MYSQL, exe="/tmp/mariadbd"),
        # the user's process in a cgroup named like the unit
        P(64, comm="mariadbd", uid=NOBODY, exe="/tmp/mariadbd", cgroup="/system.slice/mariadb.service"),
        # mysql running a deleted binary: nothing vouches for what it was
        P(65, comm="mariadbd", uid=MYSQL, exe="/usr/sbin/mariadbd (deleted)"),
        # a user's file literally named like a deleted binary
        P(66, comm="mariadbd", uid=NOBODY, exe="/usr/sbin/mariadbd (deleted)"),
    ],
)
def test_forged_databases_get_no_privilege(classes, proc):
    d = by_pid(policy.plan([INIT, proc], classes, None))[proc.pid]
    assert d.class_name not in ("database", "database-unit")
    assert d.wanted is None or d.wanted >= 0


@pytest.mark.skipif(not HAS_MYSQL, reason="no mysql user on this host")
def test_the_real_database_is_unkillable(classes):
    procs = [
        INIT,
        P(70, comm="mariadbd", uid=MYSQL, exe="/usr/sbin/mariadbd"),
        P(71, comm="mysqld", uid=MYSQL, exe="/opt/mysql/bin/mysqld", cgroup="/system.slice/mysql.service"),
    ]
    d = by_pid(policy.plan(procs, classes, None))
    assert (d[70].class_name, d[70].wanted, d[70].action) == ("database", -1000, "set")
    assert (d[71].class_name, d[71].wanted) == ("database-unit", -1000)


def test_renamed_masters_get_nothing(classes):
    procs = [
        INIT,
        P(80, comm="nginx", uid=NOBODY, exe="/tmp/nginx"),
        P(81, comm="php-fpm8.2", uid=NOBODY, exe="/usr/sbin/php-fpm8.2"),
        P(82, comm="nginx", uid=ROOT, exe="/usr/sbin/nginx (deleted)", cgroup="/oomguard.app"),
    ]
    d = by_pid(policy.plan(procs, classes, None))
    assert d[80].class_name == "app-user" and d[80].wanted == 1000
    assert d[81].class_name == "app-user"
    assert d[82].class_name is None and d[82].reason == policy.UNMATCHED


def test_a_privileged_class_must_not_match_on_names_alone():
    with pytest.raises(ConfigError, match="user together with exe, unit or cgroup"):
        parse_policy_class({"name": "db", "oom_score_adj": -1000, "comm": ["mysqld"]}, "k")
    with pytest.raises(ConfigError):
        parse_policy_class({"name": "db", "oom_score_adj": -1, "user": ["mysql"]}, "k")


# ---------------------------------------------------------------- masters and workers


def test_workers_are_told_apart_by_their_parent(classes):
    fpm = "/usr/sbin/php-fpm8.2"
    procs = [
        INIT,
        P(100, comm="php-fpm8.2", uid=ROOT, exe=fpm, adj=-900),
        # just forked: still root, still the master's binary and value
        P(101, ppid=100, comm="php-fpm8.2", uid=ROOT, exe=fpm, adj=-900),
        P(102, ppid=100, comm="php-fpm8.2", uid=WWW, exe=fpm, adj=-900),
        # a worker's child that exec'd ImageMagick as the app user
        P(103, ppid=102, comm="convert", uid=NOBODY, exe="/usr/bin/convert", adj=-900),
        P(110, comm="nginx", uid=ROOT, exe="/usr/sbin/nginx"),
        P(111, ppid=110, comm="nginx", uid=WWW, exe="/usr/sbin/nginx", adj=-800),
        # a worker upgraded under its feet keeps its class (not privileged)
        P(112, ppid=110, comm="nginx", uid=WWW, exe="/usr/sbin/nginx (deleted)", adj=-800),
    ]
    d = by_pid(policy.plan(procs, classes, None))
    assert (d[100].class_name, d[100].wanted) == ("php-fpm-master", -900)
    assert d[100].reason == policy.ALREADY and d[100].action == "skip"
    assert (d[101].class_name, d[101].wanted, d[101].action) == ("php-fpm-worker", 200, "set")
    assert d[102].class_name == "php-fpm-worker" and not d[102].essential
    assert (d[103].class_name, d[103].wanted) == ("app-user", 1000)
    assert (d[110].class_name, d[110].wanted) == ("nginx-master", -800)
    assert (d[111].class_name, d[111].wanted, d[111].action) == ("nginx-worker", 0, "set")
    assert d[112].class_name == "nginx-worker"


def test_a_parent_that_started_later_is_a_reused_pid(classes):
    fpm = "/usr/sbin/php-fpm8.2"
    master = P(100, comm="php-fpm8.2", uid=ROOT, exe=fpm, start=5000)
    child = P(101, ppid=100, comm="php-fpm8.2", uid=WWW, exe=fpm, start=400)
    d = by_pid(policy.plan([INIT, master, child], classes, None))
    assert d[101].class_name is None


def test_first_matching_class_wins_and_matchers_are_anded():
    classes = (
        parse_policy_class({"name": "a", "oom_score_adj": 10, "comm": ["py*"], "user": ["nobody"]}, "a"),
        parse_policy_class({"name": "b", "oom_score_adj": 20, "comm": ["python3"]}, "b"),
        parse_policy_class({"name": "c", "oom_score_adj": 30, "exe": ["/usr/bin/*"],
                            "cgroup": ["/shop/*"]}, "c"),
        parse_policy_class({"name": "d", "oom_score_adj": 40, "unit": ["foo-*.service"]}, "d"),
    )
    procs = [
        P(2, comm="python3", uid=NOBODY),
        P(3, comm="python3", uid=ROOT),
        P(4, comm="perl", exe="/usr/bin/perl", cgroup="/shop/x"),
        P(5, comm="perl", exe="/usr/bin/perl", cgroup="/other"),
        P(6, comm="perl", exe="/opt/perl", cgroup="/system.slice/foo-1.service"),
        P(7, comm="perl", exe=None, cgroup=None),
    ]
    d = by_pid(policy.plan(procs, classes, None))
    assert [d[i].class_name for i in range(2, 8)] == ["a", "b", "c", None, "d", None]


def test_parent_class_of_itself_covers_a_whole_tree():
    classes = (
        parse_policy_class({"name": "top", "oom_score_adj": 100, "comm": ["top*"]}, "t"),
        parse_policy_class({"name": "tree", "oom_score_adj": 200, "parent": ["top", "tree"]}, "r"),
    )
    n = 3000  # deeper than Python's recursion limit would allow naively
    procs = [P(10, comm="top1")] + [P(11 + i, ppid=10 + i, comm="sh") for i in range(n)]
    d = policy.plan(procs, classes, None)
    assert d[0].class_name == "top"
    assert all(x.class_name in ("tree", None) for x in d[1:])
    assert [x.class_name for x in d[1:200]] == ["tree"] * 199


# ---------------------------------------------------------------- root automation, inherited grants


def test_root_automation_and_what_it_is_not(classes):
    procs = [
        INIT,
        P(200, comm="cron", exe="/usr/sbin/cron", cgroup="/system.slice/cron.service"),
        P(201, comm="bash", exe="/bin/bash", cgroup="/user.slice/user-0.slice/session-3.scope"),
        P(202, comm="salt-minion", exe="/usr/bin/python3", cgroup="/system.slice/salt-minion.service"),
        P(203, comm="node", exe="/usr/bin/node", cgroup="/system.slice/docker-abc.scope"),
        P(204, comm="sh", exe="/bin/sh", cgroup="/oomguard.app"),
        P(205, comm="python3", exe="/usr/bin/python3", cgroup="/system.slice/oomguard.service"),
        # root, but not automation: left to the kernel (and to the reserve outside the app slice)
        P(206, comm="postfix", exe="/usr/lib/postfix/master", cgroup="/system.slice/postfix.service"),
        P(207, comm="runaway", exe="/usr/local/bin/runaway", cgroup="/"),
    ]
    d = by_pid(policy.plan(procs, classes, None))
    for pid, name in ((200, "root-automation"), (201, "root-sessions"), (202, "root-automation")):
        assert (d[pid].class_name, d[pid].wanted) == (name, -1000)
        assert d[pid].healer_exempt
    for pid in (203, 204, 206, 207):
        assert d[pid].class_name is None, pid
    assert d[205].class_name == "oomguard" and d[205].healer_exempt
    assert d[1].reason == policy.INIT and d[1].wanted is None


def test_the_daemon_itself_is_oomguard_wherever_it_runs(classes):
    me = P(300, comm="python3", exe="/usr/bin/python3", cgroup="/some/where")
    assert policy.plan([me], classes, None)[0].class_name is None
    d = policy.plan([me], classes, None, self_pid=300)[0]
    assert (d.class_name, d.wanted) == ("oomguard", -1000)


def test_inherited_grants_are_taken_back(classes):
    cron = "/system.slice/cron.service"
    procs = [
        INIT,
        P(400, comm="cron", exe="/usr/sbin/cron", cgroup=cron, adj=-1000),
        # a job of another user, born with cron's -1000 (and its min)
        P(401, ppid=400, comm="backup.sh", uid=WWW, exe="/bin/bash", cgroup=cron, adj=-1000),
        P(402, ppid=401, comm="tar", uid=WWW, exe="/bin/tar", cgroup=cron, adj=-1000),
        # a job that had its value changed since: not ours to undo
        P(403, ppid=400, comm="svc", uid=WWW, exe="/bin/svc", cgroup=cron, adj=-500),
        # the app user's job gets its class value anyway
        P(404, ppid=400, comm="php", uid=NOBODY, exe="/usr/bin/php8.2", cgroup=cron, adj=-1000),
        # a service user's process whose -300 came from systemd, not from us
        P(405, comm="chronyd", uid=WWW, exe="/usr/sbin/chronyd", cgroup="/system.slice/chrony.service",
          adj=-300),
        P(406, ppid=405, comm="helper", uid=WWW, exe="/usr/sbin/helper",
          cgroup="/system.slice/chrony.service", adj=-300),
        # already back at the default
        P(407, ppid=400, comm="ok", uid=WWW, exe="/bin/ok", cgroup=cron, adj=0),
        # a service user's daemon that systemd (init) started with OOMScoreAdjust=-1000
        P(408, comm="redis", uid=WWW, exe="/usr/bin/redis", cgroup="/system.slice/redis.service",
          adj=-1000),
    ]
    d = by_pid(policy.plan(procs, classes, None))
    assert (d[401].action, d[401].wanted, d[401].reason) == ("set", 0, policy.INHERITED)
    assert (d[402].action, d[402].wanted, d[402].reason) == ("set", 0, policy.INHERITED)
    assert (d[403].action, d[403].reason) == ("skip", policy.UNMATCHED)
    assert (d[404].class_name, d[404].wanted) == ("app-cron", 1000)
    assert (d[405].reason, d[406].reason) == (policy.UNMATCHED, policy.UNMATCHED)
    assert d[407].action == "skip"
    assert d[1].reason == policy.INIT  # never an origin of an inherited grant
    assert (d[408].action, d[408].reason) == ("skip", policy.UNMATCHED)


# ---------------------------------------------------------------- protected runs


def _registry(tmp_path, *runs):
    reg = RunRegistry(tmp_path / "runs.json", boot_id="test-boot")
    for r in runs:
        reg.add(r)
    return reg


def _run(rid, pid, start, cgroup=None):
    return Run(id=rid, uid=NOBODY, user="nobody", pid=pid, starttime=start, started=time.time(),
               command="import.php", cgroup=cgroup)


def test_protected_runs_and_their_descendants_are_never_touched(classes, tmp_path):
    reg = _registry(tmp_path, _run(1, 500, 5000), _run(2, 600, 6000, cgroup="/oomguard.app/run-2"))
    procs = [
        INIT,
        P(499, comm="bash", uid=NOBODY, exe="/bin/bash", adj=1000),
        P(500, ppid=499, comm="php", uid=NOBODY, exe="/usr/bin/php8.2", adj=-1000),
        P(501, ppid=500, comm="php", uid=NOBODY, exe="/usr/bin/php8.2", adj=-1000),
        P(502, ppid=501, comm="gzip", uid=NOBODY, exe="/bin/gzip", adj=-1000),
        P(600, comm="screen", uid=NOBODY, exe="/usr/bin/screen", cgroup="/oomguard.app/run-2", adj=-1000),
        P(601, comm="php", uid=NOBODY, exe="/usr/bin/php8.2", cgroup="/oomguard.app/run-2/x", adj=-1000),
        # same pid as the run, other start time: pid reuse, not protected
        P(700, comm="php", uid=NOBODY, exe="/usr/bin/php8.2", adj=0),
    ]
    d = by_pid(policy.plan(procs, classes, reg))
    assert d[499].reason == policy.ALREADY
    for pid in (500, 501, 502, 600, 601):
        assert (d[pid].action, d[pid].reason) == ("skip", policy.PROTECTED), pid
        assert d[pid].class_name == "app-user"  # shown, but not applied
    assert d[700].action == "set"
    # a plan only reads the registry: descendants found by walking the tree
    # are followed by the enforcer (through the run lifecycle), not here
    assert not reg.is_protected(502, 5020, None)


def test_apply_rechecks_protection_right_before_writing(tmp_path):
    child = _spawn_sleep(tmp_path)
    try:
        proc = procfs.snapshot(child.pid)
        d = policy.decide(proc, policy.Resolver(_test_classes(), lambda pid: None, None))
        assert d.action == "set"
        reg = _registry(tmp_path, _run(1, proc.pid, proc.starttime))
        assert policy.apply([d], registry=reg) == []
        assert procfs.read_oom_score_adj(child.pid) == 0
    finally:
        _reap(child)


# ---------------------------------------------------------------- real writes (own children only)


def _test_classes(adj: int = 500) -> tuple:
    return (parse_policy_class({"name": "oomgtest", "oom_score_adj": adj, "comm": ["oomgtest-*"]}, "t"),)


@pytest.fixture(scope="module")
def sleeper_bin(tmp_path_factory):
    """A copy of sleep whose comm no other process on the host has."""
    path = tmp_path_factory.mktemp("bin") / f"oomgtest-{os.getpid() % 10000}"
    shutil.copy2(shutil.which("sleep"), path)
    return path


def _spawn_sleep(tmp_path, bin_path: Path | None = None, seconds: int = 60) -> subprocess.Popen:
    if bin_path is None:
        bin_path = tmp_path / "oomgtest-s"
        if not bin_path.exists():
            shutil.copy2(shutil.which("sleep"), bin_path)
    child = subprocess.Popen([str(bin_path), str(seconds)])
    _wait_comm(child.pid, bin_path.name[:15])
    return child


def _wait_comm(pid: int, comm: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if procfs.read_stat(pid).comm == comm:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.005)
    raise AssertionError(f"pid {pid} never became {comm}")


def _reap(child: subprocess.Popen) -> None:
    child.kill()
    child.wait()


def test_apply_writes_skips_vanished_and_reused(tmp_path, sleeper_bin):
    a = _spawn_sleep(tmp_path, sleeper_bin)
    b = _spawn_sleep(tmp_path, sleeper_bin)
    c = _spawn_sleep(tmp_path, sleeper_bin)
    try:
        procs = [procfs.snapshot(x.pid) for x in (a, b, c)]
        decisions = policy.plan(procs, _test_classes(700), None)
        assert [d.action for d in decisions] == ["set"] * 3
        _reap(b)  # vanished between plan and apply
        forged = policy.Decision(**{**decisions[2].as_dict(), "starttime": decisions[2].starttime + 1})
        changes = policy.apply([decisions[0], decisions[1], forged])
        assert [(ch.pid, ch.old, ch.new, ch.ok) for ch in changes] == [(a.pid, 0, 700, True)]
        assert procfs.read_oom_score_adj(a.pid) == 700
        assert procfs.read_oom_score_adj(c.pid) == 0  # the "reused" pid was left alone
        again = policy.plan([procfs.snapshot(a.pid)], _test_classes(700), None)
        assert again[0].reason == policy.ALREADY
    finally:
        for x in (a, c):
            _reap(x)


def test_dry_run_changes_nothing(tmp_path, sleeper_bin):
    a = _spawn_sleep(tmp_path, sleeper_bin)
    try:
        changes = policy.apply(policy.plan([procfs.snapshot(a.pid)], _test_classes(), None), dry_run=True)
        assert [(ch.new, ch.dry_run, ch.ok) for ch in changes] == [(500, True, True)]
        assert procfs.read_oom_score_adj(a.pid) == 0
    finally:
        _reap(a)


@pytest.mark.skipif(procfs.has_cap_sys_resource(), reason="needs a host without CAP_SYS_RESOURCE")
def test_a_refused_lowering_is_reported_not_raised(tmp_path, sleeper_bin):
    a = _spawn_sleep(tmp_path, sleeper_bin)
    try:
        procs = [procfs.snapshot(a.pid)]
        cls = (parse_policy_class({"name": "low", "oom_score_adj": -5, "user": [0],
                                   "exe": [str(sleeper_bin)]}, "t"),)
        changes = policy.apply(policy.plan(procs, cls, None))
        assert len(changes) == 1 and not changes[0].ok
        assert "CAP_SYS_RESOURCE" in changes[0].error
    finally:
        _reap(a)


# ---------------------------------------------------------------- the enforcer


def test_enforcer_on_exec_and_on_fork(tmp_path, sleeper_bin):
    seen = []
    enf = Enforcer(_test_classes(600), None, on_change=seen.append)
    a = _spawn_sleep(tmp_path, sleeper_bin)
    try:
        d = enf.on_exec(a.pid)
        assert d.class_name == "oomgtest" and procfs.read_oom_score_adj(a.pid) == 600
        assert [(c.pid, c.new) for c in seen] == [(a.pid, 600)]
        assert enf.on_exec(a.pid).reason == policy.ALREADY
        assert enf.on_fork(os.getpid(), a.pid).reason == policy.ALREADY
        assert enf.on_exec(999_999_999) is None  # gone: no error
        enf.handle(("exec", "not-a-pid"))  # a bad event never raises
        enf.handle(("exit", a.pid, 0))
        assert not any(k[0] == a.pid for k in enf._classes)
    finally:
        _reap(a)


def test_enforcer_on_fork_tells_the_registry_first(tmp_path, sleeper_bin):
    """A protected run's child must not get the app value, even though the
    registry only learns about it from this very event."""
    me = procfs.snapshot(os.getpid())
    reg = _registry(tmp_path, _run(1, me.pid, me.starttime))
    enf = Enforcer(_test_classes(600), reg)
    a = _spawn_sleep(tmp_path, sleeper_bin)
    try:
        d = enf.on_fork(os.getpid(), a.pid)
        assert d.reason == policy.PROTECTED
        assert procfs.read_oom_score_adj(a.pid) == 0
        assert reg.is_protected(a.pid, procfs.starttime_of(a.pid), None)
    finally:
        _reap(a)


def test_enforcer_poll_once_finds_new_and_execd_processes(tmp_path, sleeper_bin):
    enf = Enforcer(_test_classes(400), None, full_sweep_every=1000)
    enf.poll_once()  # the first round looks at everything
    a = _spawn_sleep(tmp_path, sleeper_bin)
    # a process that exec's into the test binary after the first round
    b = subprocess.Popen([sys.executable, "-c", f"import os,time; time.sleep(0.3); os.execv({str(sleeper_bin)!r}, ['s', '60'])"])
    try:
        changes = enf.poll_once()
        assert (a.pid, 400) in [(c.pid, c.new) for c in changes]
        assert procfs.read_oom_score_adj(b.pid) == 0
        _wait_comm(b.pid, sleeper_bin.name[:15])
        changes = enf.poll_once()
        assert [(c.pid, c.new) for c in changes] == [(b.pid, 400)]
        assert procfs.read_oom_score_adj(b.pid) == 400
        assert enf.poll_once() == []
    finally:
        _reap(a)
        _reap(b)


def test_place_moves_only_the_app_users_unprotected_processes(tmp_path, monkeypatch, sleeper_bin):
    moved = []
    monkeypatch.setattr(cgroups, "move", lambda pid, cg: moved.append((pid, cg)))
    a = _spawn_sleep(tmp_path, sleeper_bin)
    try:
        me = procfs.snapshot(a.pid)
        enf = Enforcer(_test_classes(), None, app_cgroup="oomguard.app", app_uid=me.uid)
        assert enf.place(a.pid) is True
        assert moved == [(a.pid, "/oomguard.app")]
        other = Enforcer(_test_classes(), None, app_cgroup="oomguard.app", app_uid=me.uid + 1)
        assert other.place(a.pid) is False
        inside = Enforcer(_test_classes(), None, app_cgroup=me.cgroup or "/", app_uid=me.uid)
        if (me.cgroup or "/") != "/":
            assert inside.place(a.pid) is False  # already there
        reg = _registry(tmp_path, _run(1, me.pid, me.starttime))
        prot = Enforcer(_test_classes(), reg, app_cgroup="oomguard.app", app_uid=me.uid)
        assert prot.place(a.pid) is False  # a protected run stays in its own cgroup
        assert len(moved) == 1
        # the event path places too
        moved.clear()
        enf.on_exec(a.pid)
        assert moved == [(a.pid, "/oomguard.app")]
    finally:
        _reap(a)


def test_from_config_without_systemd_places_into_the_app_cgroup():
    cfg = parse({"layout": {"app_user": "nobody", "app_cgroup": "shop/app"}})
    enf = Enforcer.from_config(cfg, None, systemd=False)
    assert (enf.app_cgroup, enf.app_uid) == ("/shop/app", NOBODY)
    assert "app-user" in [c.name for c in enf.classes]
    assert Enforcer.from_config(cfg, None, systemd=True).app_cgroup is None
    missing = Config(layout=LayoutConfig(app_user="no-such-user-oomg"))
    assert Enforcer.from_config(missing, None, systemd=False).app_uid is None


def test_enforcer_handles_uid_changes_and_lost_events(tmp_path, sleeper_bin, monkeypatch):
    enf = Enforcer(_test_classes(300), None)
    a = _spawn_sleep(tmp_path, sleeper_bin)
    try:
        enf.handle(("uid", a.pid, 65534, 65534))
        assert procfs.read_oom_score_adj(a.pid) == 300
        fulls = []
        monkeypatch.setattr(enf, "poll_once", lambda full=None: fulls.append(full))
        enf.handle(("lost",))
        assert fulls == [True]
    finally:
        _reap(a)


def test_apply_checks_and_writes_under_the_registry_lock(tmp_path, monkeypatch):
    """The broker registers a grant, then writes -1000. Checking and writing
    under the registry's lock means our write can never land in between."""
    import threading

    class Registry:
        lock = threading.RLock()

        def is_protected(self, pid, starttime, cgroup):
            assert self.lock._is_owned()
            return False

    reg = Registry()
    writes = []

    def write(pid, starttime, value):
        assert reg.lock._is_owned()
        writes.append((pid, value))

    monkeypatch.setattr(policy_writes, "_write_checked", write)
    d = policy.decide(P(77, comm="oomgtest-x"), policy.Resolver(_test_classes(), lambda pid: None, None))
    assert [c.ok for c in policy.apply([d], registry=reg)] == [True]
    assert writes == [(77, 500)]


def test_on_fork_uses_the_parent_named_by_the_event_even_after_it_exited(tmp_path):
    sh, sleep = tmp_path / "oomgtest-par", tmp_path / "oomgtest-kid"
    shutil.copy2("/bin/sh", sh)
    shutil.copy2(shutil.which("sleep"), sleep)
    classes = (
        parse_policy_class({"name": "par", "oom_score_adj": 100, "comm": ["oomgtest-par"]}, "a"),
        parse_policy_class({"name": "kid", "oom_score_adj": 300, "comm": ["oomgtest-kid"],
                            "parent": ["par"]}, "b"),
    )
    enf = Enforcer(classes, None, self_pid=0)
    parent = subprocess.Popen([str(sh), "-c", f"read x; {sleep} 60 & exit 0"], stdin=subprocess.PIPE)
    kid_pid = None
    try:
        _wait_comm(parent.pid, "oomgtest-par")
        assert enf.check(parent.pid).class_name == "par"  # as a resync would have learned it
        parent.stdin.write(b"go\n")
        parent.stdin.close()
        parent.wait(10)

        def kid():
            for pid in procfs.list_pids():
                try:
                    st = procfs.read_stat(pid)
                except (FileNotFoundError, ProcessLookupError):
                    continue
                if (st.comm == "oomgtest-kid" and st.ppid != parent.pid
                        and procfs.read_exe(pid) == str(sleep)):  # ours, not another run's
                    return pid
            return None

        deadline = time.monotonic() + 5
        while (kid_pid := kid()) is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # without the event's parent the orphan has no parent class
        assert Enforcer(classes, None, self_pid=0).check(kid_pid).class_name is None
        d = enf.on_fork(parent.pid, kid_pid)
        assert (d.class_name, procfs.read_oom_score_adj(kid_pid)) == ("kid", 300)
    finally:
        if parent.poll() is None:
            parent.kill()
        if kid_pid is not None:
            os.kill(kid_pid, 9)


def test_classify_writes_nothing_and_new_classes_forget_old_ones(tmp_path, sleeper_bin):
    enf = Enforcer(_test_classes(600), None, self_pid=0)
    a = _spawn_sleep(tmp_path, sleeper_bin)
    try:
        d = enf.classify(a.pid)
        assert (d.class_name, d.wanted, d.action) == ("oomgtest", 600, "set")
        assert procfs.read_oom_score_adj(a.pid) == 0
        assert enf.classify(999_999_999) is None
        enf.classes = (parse_policy_class({"name": "other", "oom_score_adj": 100, "comm": ["none"]}, "o"),)
        assert enf.classify(a.pid).class_name is None  # not the remembered "oomgtest"
    finally:
        _reap(a)


def test_a_daemonizing_service_is_classified_by_its_true_parents_once_it_settles(tmp_path):
    """A launcher forks the real master and exits; the master forks workers,
    all without exec (as php-fpm and nginx do). At fork time the master looks
    like the launcher's worker and its workers like masters; the settle pass
    must put both right. Real processes and real process events."""
    import threading

    from oomguard.host import procevents

    srv = tmp_path / "oomgtest-srv"
    shutil.copy2(os.path.realpath("/usr/bin/python3"), srv)
    classes = (
        parse_policy_class({"name": "worker", "oom_score_adj": 300, "parent": ["master"],
                            "exe": [str(srv)]}, "w"),
        parse_policy_class({"name": "master", "oom_score_adj": 100, "user": ["root"], "exe": [str(srv)]}, "m"),
    )
    enf = Enforcer(classes, None)
    stop = threading.Event()
    pe = procevents.ProcEvents()
    pe.open()
    threads = [threading.Thread(target=pe.run, args=(enf.handle, stop), daemon=True),
               threading.Thread(target=enf.run_upkeep, args=(stop, 5.0), daemon=True)]  # a lost event: resynced
    for t in threads:
        t.start()
    daemonize = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    for _ in range(2):\n"
        "        if os.fork() == 0:\n"
        "            while True: time.sleep(1)\n"
        "    while True: time.sleep(1)\n"
        "os._exit(0)\n"
    )
    subprocess.run([str(srv), "-I", "-S", "-c", daemonize], check=True)  # the launcher exits at once

    def ours():
        out = {}
        for pid in procfs.list_pids():
            try:
                if procfs.read_exe(pid) == str(srv):
                    out[pid] = procfs.read_stat(pid).ppid
            except OSError:
                pass
        return out

    try:
        deadline = time.monotonic() + 30
        while True:
            procs = ours()
            masters = [p for p, pp in procs.items() if pp not in procs]
            workers = [p for p, pp in procs.items() if pp in procs]
            values = {p: procfs.read_oom_score_adj(p) for p in procs}
            if len(masters) == 1 and len(workers) == 2 and values[masters[0]] == 100 and \
                    all(values[w] == 300 for w in workers):
                break
            assert time.monotonic() < deadline, (masters, workers, values)
            time.sleep(0.1)
    finally:
        stop.set()
        for pid in ours():
            os.kill(pid, 9)
        for t in threads:
            t.join(5)


def test_a_cmdline_glob_tells_queue_consumers_from_other_workers_of_the_same_binary():
    classes = (
        parse_policy_class({"name": "consumer", "oom_score_adj": 800,
                            "cmdline": ["* bin/magento queue:consumers:start *"]}, "q"),
        parse_policy_class({"name": "php", "oom_score_adj": 200, "comm": ["python*"]}, "p"),
    )
    argv = [sys.executable, "-c", "import time; time.sleep(300)"]
    consumer = subprocess.Popen(argv + ["bin/magento", "queue:consumers:start", "product_import"])
    other = subprocess.Popen(argv + ["bin/magento", "cron:run"])
    try:
        for p in (consumer, other):  # exec'd: argv is the interpreter's, not the fork's
            deadline = time.monotonic() + 30
            while "bin/magento" not in procfs.read_cmdline(p.pid):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        procs = [procfs.snapshot(p.pid) for p in (consumer, other)]
        d = by_pid(policy.plan(procs, classes, None))
        assert (d[consumer.pid].class_name, d[other.pid].class_name) == ("consumer", "php")
    finally:
        for p in (consumer, other):
            p.kill()
            p.wait()
