"""Commands the healer runs: no shell, never at the daemon's -1000, killed at their time-out."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from probe_servers import alive

from oomguard.healer import commands

ADJ_SCRIPT = textwrap.dedent(
    """
    import shutil, subprocess, sys
    from oomguard.healer import commands
    if sys.argv[2] == "no-choom":
        shutil.which = lambda name, *a, **k: None
    out = sys.argv[1]
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("300")  # stands in for the daemon's -1000: raising needs no privilege
    plain = subprocess.run(["cat", "/proc/self/oom_score_adj"], capture_output=True, text=True).stdout.strip()
    r = commands.run_command(["sh", "-c", "cat /proc/self/oom_score_adj > " + out], 10)
    print(plain, r.returncode, open(out).read().strip())
    """
)


@pytest.mark.parametrize("mode", ["choom", "no-choom"])
def test_commands_do_not_inherit_the_daemons_oom_score_adj(tmp_path, mode):
    """A parent at 300 (the test cannot lower itself to -1000 without
    CAP_SYS_RESOURCE; any inherited value shows the same thing): a plain child
    inherits 300, a child started by run_command starts at 0."""
    if mode == "choom" and not shutil.which("choom"):
        pytest.skip("choom not installed")
    src = str(Path(commands.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=src)
    out = subprocess.run(
        [sys.executable, "-c", ADJ_SCRIPT, str(tmp_path / "adj"), mode],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    plain, rc, child = out.stdout.split()
    assert plain == "300"
    assert rc == "0"
    assert child == "0"


def test_child_argv_uses_choom_without_a_shell():
    if not shutil.which("choom"):
        pytest.skip("choom not installed")
    argv = commands.child_argv(["systemctl", "restart", "php8.2-fpm"])
    assert os.path.basename(argv[0]) == "choom"
    assert argv[1:] == ["-n", "0", "--", "systemctl", "restart", "php8.2-fpm"]


def test_restart_style_command_keeps_what_it_started(tmp_path):
    """kill_group=False: a restart that times out loses only its own process,
    not the service it left behind in its process group."""
    pidfile = tmp_path / "svc.pid"
    r = commands.run_command(
        ["sh", "-c", f"sleep 1000 & echo $! > {pidfile}; sleep 1000"], 0.5, kill_group=False
    )
    assert r.timed_out
    svc = int(pidfile.read_text())
    try:
        assert alive(svc)
    finally:
        os.killpg(os.getpgid(svc), signal.SIGKILL)  # the service and the orphaned foreground sleep
