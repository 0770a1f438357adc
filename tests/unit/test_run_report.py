"""A run's report at its end, on its terminal (oom-protect --report), and the
client's --report option."""

from __future__ import annotations

import os
import select
import time

import pytest
from broker_rig import in_process_daemon

from oomguard import protect
from oomguard.runs.run import Run


def test_the_summary_reaches_the_runs_terminal_when_it_ends(rig):
    d = in_process_daemon(rig)
    master, slave = os.openpty()
    try:
        now = time.time()
        run = Run(d.registry.new_id(), os.getuid(), "root", 999_997, 1, now - 65, "php import.php", None,
                  tty=os.ttyname(slave), ended=now, exit_status=0, end_reason="exited", peak_memory=300 << 20,
                  extra={"report": True})  # fmt: skip
        d.registry.add(run)
        d.store.add("oom_kill", {"victim_pid": 7, "victim_comm": "php-fpm8.2", "victim_uid": 33,
                                 "protected_runs": [{"id": run.id, "uid": os.getuid()}]}, ts=now - 30)  # fmt: skip
        d.on_run_end(run)
        assert select.select([master], [], [], 5)[0]
        text = os.read(master, 4096).decode()
        assert f"oomguard: run {run.id} ended after 65 s (its own exit, exit status 0)" in text
        assert "peak memory 300 MiB; 1 OOM kill while it ran" in text
    finally:
        os.close(master)
        os.close(slave)
        d.event_reader.close()
        d.store.close()


def test_without_report_the_terminal_is_left_alone(rig):
    d = in_process_daemon(rig)
    master, slave = os.openpty()
    try:
        run = Run(d.registry.new_id(), os.getuid(), "root", 999_996, 1, time.time(), "x", None,
                  tty=os.ttyname(slave), ended=time.time(), end_reason="exited")  # fmt: skip
        d.registry.add(run)
        d.on_run_end(run)
        assert not select.select([master], [], [], 0.3)[0]
    finally:
        os.close(master)
        os.close(slave)
        d.event_reader.close()
        d.store.close()


def test_the_client_takes_report_before_the_command():
    def parsed(*argv):
        what, cmd, options = protect.parse_args(["oom-protect", *argv])
        return what, cmd, options["report"]

    assert parsed("--report", "php", "x.php") == ("run", ["php", "x.php"], True)
    assert parsed("--report", "--", "-x") == ("run", ["-x"], True)
    assert parsed("php", "--report") == ("run", ["php", "--report"], False)  # CMD's own
    with pytest.raises(ValueError, match="--help goes alone"):
        protect.parse_args(["oom-protect", "--report", "--help"])
