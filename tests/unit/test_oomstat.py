"""host.oomstat: the OOM ranking's readers against the real /proc."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_procfs import child  # noqa: F401 - the fixture

from oomguard.host import oomstat, procfs
from oomguard.host.procfs import NoSuchProcess


def test_the_oom_ranking_readers_see_the_child_as_the_kernel_does(child):  # noqa: F811
    p, exe = child
    procfs.write_oom_score_adj(300, p.pid)
    s = oomstat.read_oom_sample(p.pid)
    assert s is not None
    assert (s.pid, s.comm, s.kthread, s.uid, s.oom_score_adj) == (p.pid, exe.name, False, 65534, 300)
    assert s.starttime == procfs.read_stat(p.pid).starttime and s.rss_pages > 0
    assert s.oom_score == procfs.read_oom_score(p.pid)
    o = oomstat.read_oom_status(p.pid)
    assert (o.name, o.euid, o.ppid) == (exe.name, 65534, os.getpid())
    assert o.rss_kb > 0 and o.swap_kb is not None and o.pte_kb is not None


def test_a_root_owned_proc_dir_is_seen_through_to_the_real_uid():
    # This test process is root's: the sample reads status for the uid.
    s = oomstat.read_oom_sample(os.getpid())
    assert s is not None and s.uid == os.geteuid() == procfs.read_status().uids[1]


def test_kernel_threads_have_no_mm_and_are_left_out_unless_asked():
    kthreadd = 2
    assert oomstat.read_oom_sample(kthreadd) is None
    s = oomstat.read_oom_sample(kthreadd, kernel_threads=True)
    assert s is not None and s.kthread and s.rss_pages == 0
    o = oomstat.read_oom_status(kthreadd)
    assert o.swap_kb is None and o.pte_kb is None


def test_a_gone_process_raises_no_such_process(child):  # noqa: F811
    p, _ = child
    p.kill()
    p.wait()
    for read in (oomstat.read_oom_status, oomstat.read_oom_sample):
        with pytest.raises(NoSuchProcess) as e:
            read(p.pid)
        assert e.value.pid == p.pid


def test_swappiness_is_the_sysctl():
    assert oomstat.swappiness() == int(Path("/proc/sys/vm/swappiness").read_text())


def test_the_euid_from_the_uid_line_alone_is_the_full_parses():
    for data in (open("/proc/self/status", "rb").read(), b"Name:\tx\nUid:\t1000\t33\t33\t33\nGid:\t0\t0\t0\t0\n"):
        assert oomstat.parse_euid(data) == oomstat.parse_oom_status(data).euid
