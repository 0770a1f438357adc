"""oomguard.host.pidfd: the one pin-and-check helper, on real processes."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from oomguard.host import pidfd, procfs
from oomguard.host.procfs import NoSuchProcess


def test_pins_a_live_process_and_reads_through_its_directory() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        with pidfd.Pinned.open(child.pid) as p:
            assert p.key == (child.pid, procfs.read_stat(child.pid).starttime)
            assert p.read_stat().comm == "sleep"
            assert p.read_status().uids[0] == os.getuid()
            assert p.read_oom_score_adj() == procfs.read_oom_score_adj(child.pid)
            assert not p.exited()
            assert p.send(signal.SIGKILL)
            child.wait()
            assert p.exited()
            assert not p.send(signal.SIGTERM)
            # the directory fd stays bound to the dead process: no reuse can redirect it
            with pytest.raises(NoSuchProcess):
                p.read_stat()
        assert p.pidfd == -1 and p.dirfd == -1
    finally:
        child.kill()
        child.wait()


def test_refuses_a_process_that_is_not_the_expected_one() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        start = procfs.read_stat(child.pid).starttime
        with pytest.raises(NoSuchProcess) as e:
            pidfd.Pinned.open(child.pid, expect_start=start + 1)
        assert e.value.why == "pid reused"
        pidfd.Pinned.open(child.pid, expect_start=start).close()
    finally:
        child.kill()
        child.wait()


def test_a_gone_pid_raises_the_one_gone_error_and_leaks_no_fd() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(NoSuchProcess) as e:
        pidfd.Pinned.open(child.pid)
    assert isinstance(e.value, ProcessLookupError) and isinstance(e.value, FileNotFoundError)
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_zombie_counts_as_exited() -> None:
    child = subprocess.Popen(["true"])
    fd = os.pidfd_open(child.pid)
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        assert pidfd.exited(fd)
        with pytest.raises(NoSuchProcess):
            pidfd.Pinned.open(child.pid)
    finally:
        os.close(fd)
        child.wait()
