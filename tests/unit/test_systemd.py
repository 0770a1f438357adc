"""host.systemd: systemctl as argv lists, through an injectable runner."""

import subprocess

import pytest

from oomguard.host import systemd


def test_the_calls_setup_makes():
    ran: list[list[str]] = []
    systemd.daemon_reload(ran.append)
    systemd.enable_now("oomguard.service", ran.append)
    systemd.systemctl("restart", "nginx.service", run=ran.append)
    assert ran == [["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", "oomguard.service"],
                   ["systemctl", "restart", "nginx.service"]]  # fmt: skip


def test_a_failure_reaches_the_caller():
    def failing(argv):
        raise subprocess.CalledProcessError(1, argv)

    with pytest.raises(subprocess.CalledProcessError) as e:
        systemd.enable_now("x.service", failing)
    assert e.value.cmd == ["systemctl", "enable", "--now", "x.service"]
