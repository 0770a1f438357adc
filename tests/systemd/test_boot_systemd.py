"""The systemd guest itself: what every other test under tests/systemd relies on."""

from __future__ import annotations

import os
import pwd
import socket
from pathlib import Path

from systemd_tools import cgroup_of, run, systemctl, unit_property, wait_until

UNWANTED = ("earlyoom.service", "nohang.service", "postgresql.service", "prometheus.service")


def test_pid1_is_systemd_and_the_tests_run_as_its_unit():
    assert Path("/proc/1/comm").read_text().strip() == "systemd"
    assert cgroup_of(os.getpid()) == "/system.slice/oomguard-test.service"
    assert unit_property("oomguard-test.service", "ActiveState") == "active"


def test_the_boot_finished_with_nothing_failed():
    state = wait_until(
        lambda: (
            (s := systemctl("is-system-running", check=False).stdout.strip()) != "starting" and s
        ),
        "the boot to finish",
    )
    failed = systemctl("list-units", "--failed", "--plain", "--no-legend").stdout
    assert (state, failed) == ("running", "")


def test_only_our_target_started_nothing_the_image_enables():
    for unit in UNWANTED:
        assert unit_property(unit, "ActiveState") == "inactive", unit
    assert unit_property("oomguard-test.target", "ActiveState") == "active"
    assert unit_property("systemd-tmpfiles-setup.service", "LoadState") == "masked"


def test_dbus_and_journald_answer():
    names = run(["busctl", "list", "--no-pager", "--no-legend"]).stdout
    assert "org.freedesktop.systemd1" in names
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect("/run/systemd/journal/socket")


def test_a_transient_scope_gets_its_memory_limit():
    out = run(
        ["systemd-run", "--scope", "--quiet", "-p", "MemoryMax=100M", "--",
         "sh", "-c", 'cat "/sys/fs/cgroup$(sed -n "s/^0:://p" /proc/self/cgroup)/memory.max"']
    ).stdout  # fmt: skip
    assert out.strip() == "104857600"


def test_the_tmpfiles_the_services_need_exist():
    for path in ("/run/mysqld", "/run/php", "/run/user"):
        assert Path(path).is_dir(), path
    assert Path("/run/mysqld").stat().st_uid == pwd.getpwnam("mysql").pw_uid


def test_loopback_is_up():
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
