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

The guest's /usr is a writable overlay too, for test_package_systemd.py,
which installs, upgrades and purges the Debian package with apt.  Its two
.debs are built on the host before the boot (``build_debs``) into
<results>/debs, which the guest sees as /results/debs.

Host knobs: OOMGUARD_SYSTEMD_GUEST_RESULTS (host dir for console.log,
junit.xml, journal.txt, ...), OOMGUARD_SYSTEMD_GUEST_TIMEOUT (seconds,
default 1200: the pipeline and Ansible tests add minutes under TCG), OOMGUARD_SYSTEMD_GUEST_MEM (MiB, default 1024).
"""

from __future__ import annotations

import email.utils
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parent
IN_GUEST = os.environ.get("OOMGUARD_IN_GUEST") == "1"
for _d in (str(SYSTEMD_DIR.parent / "guest"), str(SYSTEMD_DIR)):  # harness, systemd_tools
    if _d not in sys.path:  # under any --import-mode
        sys.path.insert(0, _d)

from harness.bridge import REPORT_ENV, GuestSuite, record_report  # noqa: E402
from systemd_tools import DEBS_ENV, NEXT_SUFFIX, run  # noqa: E402

REPO = SYSTEMD_DIR.parents[1]


def build_debs(results: Path, nodeids: list[str]) -> dict[str, str]:
    """Host side, before the boot, only when the package test is selected:
    this tree's .deb and the same tree one version up (a new changelog
    entry), both by scripts/build-deb, in parallel.  A failed build is
    written to build-error.txt for the guest test to fail with; the other
    tests still run."""
    if not any("test_package_systemd.py" in n for n in nodeids):
        return {}
    out = results / "debs"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}
    with tempfile.TemporaryDirectory(prefix="oomguard-next-") as tmp:
        nxt = Path(tmp, "src")
        shutil.copytree(REPO, nxt, ignore=shutil.ignore_patterns(
            ".git", "dist", "build", ".guest", "*.egg-info", "__pycache__", ".*_cache"))  # fmt: skip
        changelog = nxt / "debian/changelog"
        version = subprocess.run(["dpkg-parsechangelog", "-l", str(changelog), "-S", "Version"],
                                 capture_output=True, text=True, check=True, env=env).stdout.strip()  # fmt: skip
        changelog.write_text(
            f"oomguard ({version}{NEXT_SUFFIX}) unstable; urgency=medium\n\n"
            "  * Test build for the upgrade test: the same tree, one version up.\n\n"
            f" -- oomguard maintainers <oomguard@example.org>  {email.utils.formatdate()}\n\n"
            + changelog.read_text()
        )
        builds = {name: subprocess.Popen([str(tree / "scripts/build-deb"), "--out", str(out / name)],
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
                  for name, tree in (("previous", REPO), ("next", nxt))}  # fmt: skip
        errors = []
        for name, proc in builds.items():
            log = proc.communicate(timeout=900)[0]
            (out / f"build-{name}.log").write_text(log)
            if proc.returncode != 0:
                errors.append(f"scripts/build-deb ({name}) exited {proc.returncode}:\n{log[-3000:]}")
    if errors:
        (out / "build-error.txt").write_text("\n".join(errors))
    return {DEBS_ENV: f"/results/{out.relative_to(results)}"}


SUITE = GuestSuite(
    SYSTEMD_DIR, flavour="systemd", env_prefix="OOMGUARD_SYSTEMD_GUEST", timeout=1200,
    writable=("/usr",), prepare=build_debs,
)

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
