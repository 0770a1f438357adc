"""Smoke tests of the real-kernel guest itself (they run as root in the guest).

They check the things every other guest test relies on: real root with
CAP_SYS_RESOURCE, cgroup v2 with the memory controller, working unprivileged
users, the read-only host root with writable overlays, loopback and ptys.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CAP_SYS_RESOURCE = 24
WRITABLE = [
    "/tmp",
    "/var/lib",
    "/var/log",
    "/var/cache",
    "/var/tmp",
    "/etc",
    "/root",
    "/home",
    "/srv",
    "/opt",
    "/run",
]


def test_root_has_cap_sys_resource_and_can_set_oom_score_adj_min():
    status = Path("/proc/self/status").read_text()
    cap_eff = int(re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    assert cap_eff >> CAP_SYS_RESOURCE & 1

    child = subprocess.run(
        ["sh", "-c", "echo -1000 > /proc/self/oom_score_adj && cat /proc/self/oom_score_adj"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert child.stdout.strip() == "-1000"
    choom = subprocess.run(
        ["choom", "-n", "-1000", "--", "cat", "/proc/self/oom_score_adj"], capture_output=True
    )
    assert choom.stdout.strip() == b"-1000", choom.stderr


def test_unprivileged_user_cannot_lower_oom_score_adj(unpriv_user):
    result = unpriv_user.run(["choom", "-n", "-1000", "--", "true"])
    assert result.returncode != 0
    assert "Permission denied" in result.stderr
    raised = unpriv_user.run(["choom", "-n", "500", "--", "cat", "/proc/self/oom_score_adj"])
    assert raised.stdout.strip() == "500", raised.stderr


def test_cgroup_v2_memory_limit_oom_kills_inside_the_cgroup(cgroup, kmsg):
    assert "memory" in Path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
    assert {"memory", "pids"} <= set(
        Path("/sys/fs/cgroup/cgroup.subtree_control").read_text().split()
    )
    assert Path("/proc/pressure/memory").is_file() and (cgroup.path / "memory.pressure").is_file()

    cgroup.write("memory.max", 32 << 20)
    hog = cgroup.popen([sys.executable, "-c", "x = b'x' * (96 << 20)"], stderr=subprocess.DEVNULL)
    assert hog.wait(timeout=120) == -9
    assert cgroup.stat("memory.events")["oom_kill"] >= 1
    kmsg.wait_for(rf"Killed process {hog.pid}\b")


def test_cgroup_fixture_kills_leftovers(cgroup):
    sleeper = cgroup.popen(["sleep", "600"])
    assert cgroup.pids() == [sleeper.pid]
    cgroup.destroy()
    assert sleeper.wait(timeout=10) == -9
    assert not cgroup.path.exists()


def test_unprivileged_user_runs_project_python_and_imports_from_repo(unpriv_user):
    assert unpriv_user.uid >= 1000 and unpriv_user.name == "shopuser"
    script = (
        "import os, sys\n"
        "repo = sys.argv[1]\n"
        "sys.path[:0] = [os.path.join(repo, 'src'), os.path.join(repo, 'tests', 'guest')]\n"
        "import harness\n"
        "os.listdir(repo)\n"
        "if os.path.isdir(os.path.join(repo, 'src')): os.listdir(os.path.join(repo, 'src'))\n"
        "open(os.path.expanduser('~/probe'), 'w').close()\n"
        "print(os.getuid(), os.getgid(), harness.__file__)\n"
    )
    result = unpriv_user.run([sys.executable, "-c", script, str(REPO)])
    assert result.returncode == 0, result.stderr
    uid, gid, module = result.stdout.split()
    assert (int(uid), int(gid)) == (unpriv_user.uid, unpriv_user.gid)
    assert module == str(REPO / "tests" / "guest" / "harness" / "__init__.py")


def test_host_root_is_read_only_and_overlays_are_writable(unpriv_user):
    with pytest.raises(OSError) as excinfo:
        open("/usr/oomguard-probe", "w")
    assert excinfo.value.errno == errno.EROFS
    with pytest.raises(OSError) as excinfo:
        open(REPO / "oomguard-probe", "w")
    assert excinfo.value.errno == errno.EROFS  # the repo is read-only, wherever it is

    for directory in WRITABLE:
        probe = Path(directory) / "oomguard-probe"
        probe.write_text("x")
        probe.unlink()
    assert Path("/tmp").stat().st_mode & 0o7777 == 0o1777
    assert Path("/dev/shm").stat().st_mode & 0o7777 == 0o1777
    result = unpriv_user.run(
        [
            "sh",
            "-c",
            "echo x > /tmp/user-probe && echo y > /dev/shm/user-probe && rm /tmp/user-probe",
        ]
    )
    assert result.returncode == 0, result.stderr


def test_loopback_is_up_and_hostname_resolves():
    flags = int(Path("/sys/class/net/lo/flags").read_text(), 16)
    assert flags & 0x1  # IFF_UP
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname(), timeout=10) as client:
            conn, _ = server.accept()
            with conn:
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"
    assert socket.gethostbyname(socket.gethostname()).startswith("127.")


def test_ptys_and_results_share_work(guest_results_dir):
    primary, secondary = os.openpty()
    try:
        assert os.ttyname(secondary).startswith("/dev/pts/")
    finally:
        os.close(primary)
        os.close(secondary)
    (guest_results_dir / "smoke.txt").write_text("written in the guest\n")
    assert (guest_results_dir / "smoke.txt").read_text() == "written in the guest\n"
