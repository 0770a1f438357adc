"""Tests under a real systemd: one guest boot with systemd 252 as PID 1.

On the host (``OOMGUARD_IN_GUEST`` unset) every selected test under
tests/systemd/ runs in ONE systemd guest (tests/guest/harness, flavour
"systemd"; mechanism in harness/bridge.py): the guest boots into
oomguard-test.target (basic.target and nothing else) and runs pytest as
oomguard-test.service.  A guest that cannot boot fails every test here
loudly; a test skipped in the guest fails on the host.

In the guest the tests run as root in /system.slice/oomguard-test.service,
with the plain guest's writable overlays (/etc, /var, /tmp, /root, /home,
...), dbus, journald and the Debian units of the host image (nginx,
php8.2-fpm, mariadb) available but stopped.  Whatever a test starts or
installs, it stops or removes in a finalizer: the tests share one boot.

Host knobs: OOMGUARD_SYSTEMD_GUEST_RESULTS (host dir for console.log,
junit.xml, journal.txt, ...), OOMGUARD_SYSTEMD_GUEST_TIMEOUT (seconds,
default 1200: the pipeline and Ansible tests add minutes under TCG), OOMGUARD_SYSTEMD_GUEST_MEM (MiB, default 1024).
"""

from __future__ import annotations

import os
import pwd
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parent
IN_GUEST = os.environ.get("OOMGUARD_IN_GUEST") == "1"
for _d in (str(SYSTEMD_DIR.parent / "guest"), str(SYSTEMD_DIR)):  # harness, systemd_tools
    if _d not in sys.path:  # under any --import-mode
        sys.path.insert(0, _d)

from harness.bridge import REPORT_ENV, GuestSuite, record_report  # noqa: E402
from systemd_tools import run  # noqa: E402

SUITE = GuestSuite(SYSTEMD_DIR, flavour="systemd", env_prefix="OOMGUARD_SYSTEMD_GUEST", timeout=1200)

if not IN_GUEST:

    @pytest.hookimpl(trylast=True)  # after -k/-m deselection and other plugins
    def pytest_collection_modifyitems(session, config, items):
        SUITE.replace_items(items)

    def pytest_terminal_summary(terminalreporter, exitstatus, config):
        if (summary := SUITE.summary()) is not None:
            terminalreporter.write_sep("-", "oomguard systemd guest")
            terminalreporter.write_line(summary)


# ============================================================================
# In the guest
# ============================================================================

# Popped so that processes started by the tests (a nested pytest...) don't write to it.
_REPORT_PATH = os.environ.pop(REPORT_ENV, None) if IN_GUEST else None

if _REPORT_PATH:

    def pytest_runtest_logreport(report):
        record_report(report, _REPORT_PATH)


@dataclass(frozen=True)
class LoginUser:
    name: str
    uid: int
    gid: int
    home: Path


@pytest.fixture(scope="session")
def app_user() -> LoginUser:
    """``shopuser``, a regular login user created in the guest's writable /etc."""
    name = "shopuser"
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        run(["useradd", "--create-home", "--user-group", "--shell", "/bin/bash", name])
        pw = pwd.getpwnam(name)
    return LoginUser(pw.pw_name, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir))
