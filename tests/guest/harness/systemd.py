"""The systemd flavour of the guest: systemd 252 as PID 1, the command as a unit.

init.sh assembles the same root as for the plain guest, copies what
``write_boot_files`` puts in ``<results>/.guest/systemd/`` into the guest's
writable /etc/systemd/system and hands PID 1 over to systemd with
``switch_root``.  Facts this rests on (issue 9, measured in this guest):

- systemd sees "docker" (the host root has /.dockerenv) and then ignores the
  kernel command line, so the target goes on systemd's own command line;
- systemd-tmpfiles-setup.service takes over a minute over 9p: it is masked,
  and a oneshot of ours creates only the tmpfiles entries the tests need;
- a target of our own that needs only basic.target starts nothing else the
  host image has enabled (earlyoom, postgresql, prometheus, ...).

The command runs as ``oomguard-test.service``: it prints the same
OOMGUARD-GUEST lines on the console as the plain guest's /init, writes its
exit status to /results/rc, saves the journal to /results/journal.txt and
powers the guest off.
"""

from __future__ import annotations

from pathlib import Path

TARGET = "oomguard-test.target"
TEST_UNIT = "oomguard-test.service"

#: Units that are slow over 9p or that nothing in the tests needs.
MASKED = (
    "systemd-tmpfiles-setup.service",  # 73 s over 9p; see TMPFILES
    "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-clean.timer",
    "systemd-journal-flush.service",  # the journal stays in /run: nothing to flush
    "systemd-update-utmp.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "man-db.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "phpsessionclean.timer",
)

#: Generators run as processes before any unit loads (slow under TCG) and
#: would add getty, fstab, sysv and postgresql units the tests do not want.
GENERATOR_DIRS = (
    Path("/usr/lib/systemd/system-generators"),
    Path("/etc/systemd/system-generators"),
)

#: The tmpfiles.d entries the tests need (by file name), created at boot.
TMPFILES = ("dbus.conf", "mariadb.conf", "php8.2-fpm.conf", "systemd.conf")

_TARGET_TEXT = f"""\
[Unit]
Description=oomguard tests: basic.target and nothing else, then the test command
Requires=basic.target
After=basic.target
Wants={TEST_UNIT} oomguard-test-tmpfiles.service
AllowIsolate=yes
# A boot that cannot reach basic.target must end the guest, not hang it.
JobTimeoutSec=300
JobTimeoutAction=poweroff-force
"""

_TMPFILES_TEXT = f"""\
[Unit]
Description=oomguard tests: only the tmpfiles entries the tests need
DefaultDependencies=no
After=local-fs.target
Before=sysinit.target
Conflicts=shutdown.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/systemd-tmpfiles --create {" ".join(TMPFILES)}
"""

_TEST_TEXT = """\
[Unit]
Description=oomguard tests: the test command (/results/.guest/cmd.sh)
After=basic.target dbus.socket oomguard-test-tmpfiles.service

[Service]
# exec, not oneshot: the boot finishes, so the system is "running" as on a server
Type=exec
ExecStart=/bin/sh /results/.guest/systemd/run.sh
StandardInput=null
StandardOutput=tty
StandardError=inherit
TTYPath=/dev/console
TTYReset=no
TTYVHangup=no
TimeoutStartSec=infinity
"""

# Keep the OOMGUARD-GUEST wording in sync with init.sh and vm.py.
_RUN_SCRIPT = """\
#!/bin/sh
# ExecStart of oomguard-test.service (written by tests/guest/harness/systemd.py).
echo "OOMGUARD-GUEST: ready after $(cut -d' ' -f1 /proc/uptime) s of guest uptime, running the command"
/bin/sh /results/.guest/cmd.sh </dev/null
rc=$?
journalctl -b --no-pager -o short-monotonic >/results/journal.txt 2>&1
systemctl list-units --failed --no-pager --plain >/results/failed-units.txt 2>&1
echo $rc >/results/rc
echo "OOMGUARD-GUEST: command exited with status $rc after $(cut -d' ' -f1 /proc/uptime) s of guest uptime"
sync
echo o >/proc/sysrq-trigger
"""


def write_boot_files(control: Path) -> None:
    """Write the units and the runner init.sh installs into ``control/systemd``.

    Layout read by init.sh: ``system/`` is copied into /etc/systemd/system,
    ``masked`` lists paths under /etc/systemd to link to /dev/null (units and
    generators), ``run.sh`` is the test unit's
    ExecStart.
    """
    root = control / "systemd"
    system = root / "system"
    system.mkdir(parents=True, exist_ok=True)
    (system / TARGET).write_text(_TARGET_TEXT)
    (system / TEST_UNIT).write_text(_TEST_TEXT)
    (system / "oomguard-test-tmpfiles.service").write_text(_TMPFILES_TEXT)
    generators = sorted({g.name for d in GENERATOR_DIRS if d.is_dir() for g in d.iterdir()})
    masked = [f"system/{u}" for u in MASKED] + [f"system-generators/{g}" for g in generators]
    (root / "masked").write_text("".join(f"{m}\n" for m in masked))
    (root / "run.sh").write_text(_RUN_SCRIPT)
    (root / "init").write_text(f"/lib/systemd/systemd --unit={TARGET}\n")
