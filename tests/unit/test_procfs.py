"""host.procfs against the real /proc, with real child processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from oomguard.host import cmdline, procfs
from oomguard.host.procfs import NoSuchProcess


def _await(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _asleep(pid: int, comm: str) -> bool:
    st = procfs.read_stat(pid)
    return st.comm == comm and st.state == "S" and st.rss_pages > 0


@pytest.fixture
def child():
    """A sleeping child under a name of its own, started as nobody, exec'd."""
    with tempfile.TemporaryDirectory(prefix="oomgtest-") as d:
        os.chmod(d, 0o755)  # pytest's tmp_path is root's alone: nobody could not exec from it
        exe = Path(d) / "oomgtest-procfs"
        shutil.copy2(shutil.which("sleep"), exe)
        p = subprocess.Popen([str(exe), "60", "0.5"], user=65534)
        try:
            _await(lambda: _asleep(p.pid, exe.name), "the child's exec")
            yield p, exe
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()


def _gone(p: subprocess.Popen) -> int:
    p.kill()
    p.wait()
    return p.pid


def test_stat_status_and_identity_of_a_child(child):
    p, exe = child
    st = procfs.read_stat(p.pid)
    assert (st.pid, st.ppid, st.comm) == (p.pid, os.getpid(), exe.name)
    assert st.state == "S" and st.rss_pages > 0
    assert procfs.starttime_of(p.pid) == st.starttime
    status = procfs.read_status(p.pid)
    assert status.uids == (65534,) * 4 and status.ppid == os.getpid() and status.tgid == p.pid
    assert procfs.read_exe(p.pid) == str(exe)
    assert procfs.read_cmdline(p.pid) == [str(exe), "60", "0.5"]
    assert cmdline.read_cmdline_bounded(p.pid) == f"{exe} 60 0.5"
    assert procfs.read_cgroup(p.pid) == procfs.read_cgroup(os.getpid())
    assert p.pid in procfs.list_pids()
    snap = procfs.snapshot(p.pid)
    assert snap is not None and snap.key == (p.pid, st.starttime) and snap.uid == 65534


def test_oom_score_adj_written_and_read_back(child):
    p, _ = child
    procfs.write_oom_score_adj(700, p.pid)  # raising works without CAP_SYS_RESOURCE
    assert procfs.read_oom_score_adj(p.pid) == 700
    assert procfs.read_oom_score(p.pid) >= 700 * 2 // 3


def test_a_gone_process_raises_the_one_error(child):
    p, _ = child
    pid = _gone(p)
    for read in (procfs.read_stat, procfs.read_status, procfs.read_oom_score_adj, procfs.read_cgroup):
        with pytest.raises(NoSuchProcess) as e:
            read(pid)
        assert isinstance(e.value, ProcessLookupError) and isinstance(e.value, FileNotFoundError)
        assert e.value.pid == pid
    assert procfs.snapshot(pid) is None and procfs.starttime_of(pid) is None
    assert procfs.rss_bytes(pid) == 0 and procfs.read_exe(pid) is None


def test_a_dir_fd_stays_with_its_process(child):
    p, _ = child
    fd = procfs.open_dir(p.pid)
    try:
        assert procfs.read_stat(dir_fd=fd).pid == p.pid
        _gone(p)
        with pytest.raises(NoSuchProcess):
            procfs.read_stat(dir_fd=fd)
    finally:
        os.close(fd)
    with pytest.raises(NoSuchProcess):
        procfs.open_dir(p.pid)


def test_running_is_false_for_a_zombie_and_a_reused_identity(child):
    p, _ = child
    start = procfs.read_stat(p.pid).starttime
    assert procfs.running(p.pid, start)
    assert not procfs.running(p.pid, start + 1)
    os.kill(p.pid, signal.SIGKILL)
    _await(lambda: procfs.read_stat(p.pid).state in ("Z", "X"), "the zombie")
    assert not procfs.running(p.pid, start)
    p.wait()
    assert not procfs.running(p.pid, start)


def test_system_files():
    mi = procfs.meminfo()
    assert mi["MemTotal"] > mi.get("MemAvailable", 0) > 0
    assert procfs.boot_time() < time.time() and procfs.since_boot() > 0
    assert len(procfs.boot_id()) == 36


def test_parse_stat_takes_the_last_parenthesis():
    st = procfs.parse_stat(b"42 (a) (b) c) S 1 42 42 0 -1 0 " + b"0 " * 12 + b"777 0 5 0\n")
    assert (st.pid, st.comm, st.state, st.ppid, st.starttime, st.rss_pages) == (42, "a) (b) c", "S", 1, 777, 5)
