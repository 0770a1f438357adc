"""``oomguard setup``: the memory layout that makes the policy mean something.

The app user's processes run in a memory-limited group (RAM minus a reserve
for the system), so that root automation keeps room whatever the app does,
and the services live there with OOMScoreAdjust= from the policy.

On a systemd host this is a set of unit files and drop-ins
(``render_units``). On a host without systemd (the test guest) it is the app
cgroup, made directly in cgroup v2 (``render_cgroup_steps``); the daemon
then moves the app user's new processes into it at birth
(enforcer.Enforcer.place).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TextIO

from oomguard.cli.unitfiles import HEADER, remove_files, write_files
from oomguard.config import Config, PolicyClass
from oomguard.host import cgroups, procfs, users
from oomguard.host.systemd import Runner, daemon_reload, disable_now, enable_now

UNIT_DIR = "/etc/systemd/system"
VENDOR_UNIT = "/lib/systemd/system/oomguard.service"  # the Debian package's
DROPIN_NAME = "oomguard.conf"
DEFAULT_EXEC = "/usr/bin/oomguard"
AUTO = -1  # apply_layout(app_uid=AUTO): look the app user up

# Which policy class a known service's main process belongs to. A service
# not listed here takes the first class whose `unit` globs match its name.
SERVICE_CLASSES: tuple[tuple[str, str], ...] = (
    ("nginx*.service", "nginx-master"),
    ("php*-fpm*.service", "php-fpm-master"),
    ("mariadb*.service", "database"),
    ("mysql*.service", "database"),
)


class SetupError(RuntimeError):
    pass


has_systemd = cgroups.systemd_booted
slice_cgroup = cgroups.slice_path


def app_limit(config: Config, ram_bytes: int) -> int:
    """MemoryMax of the app group: RAM minus the system reserve."""
    limit = ram_bytes - config.layout.system_reserve
    if limit < 64 << 20:
        raise SetupError(
            f"layout.system_reserve ({config.layout.system_reserve} bytes) leaves less than 64M "
            f"of {ram_bytes} bytes RAM for the app"
        )
    return limit


def service_value(service: str, classes: tuple[PolicyClass, ...]) -> int | None:
    """OOMScoreAdjust= for a service: its main process's class value."""
    by_name = {c.name: c for c in classes}
    for pattern, name in SERVICE_CLASSES:
        if fnmatchcase(service, pattern) and name in by_name:
            return by_name[name].oom_score_adj
    for c in classes:
        if any(fnmatchcase(service, u) for u in c.unit):
            return c.oom_score_adj
    return None


# ---------------------------------------------------------------- systemd


# Each directive leaves every feature working (tests/systemd proves them).
# Not used, and why: ProtectKernelLogs (/dev/kmsg is the OOM record),
# ProtectControlGroups (each run gets a cgroup
# of its own), ProtectProc=invisible (the policy and the ranking read
# every process), PrivateDevices (the tty notices write to the run's
# terminal), NoNewPrivileges (a mail hook's sendmail is setgid postdrop),
# PrivateUsers and ProtectHome=yes (hooks run as their users, a run's cwd
# may be in a home), ProtectKernelTunables (remounts /sys, cgroupfs with it,
# read-only), ProtectClock (its DeviceAllow= closes /dev/kmsg and the ttys),
# PrivateTmp (the daemon's own code may live under /tmp: a checkout, a venv).
HARDENING = (
    "# Sandbox: README.md (Debian: /usr/share/doc/oomguard) says what is left out and why.\n"
    "ProtectSystem=full\n"
    "ProtectHome=read-only\n"
    "PrivateMounts=yes\n"
    "MemoryDenyWriteExecute=yes\n"
    "UMask=0077\n"
    "ProtectKernelModules=yes\n"
    "ProtectHostname=yes\n"
    "RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6\n"
    "RestrictNamespaces=yes\n"
    "RestrictRealtime=yes\n"
    "RestrictSUIDSGID=yes\n"
    "LockPersonality=yes\n"
    "SystemCallArchitectures=native\n"
    "SystemCallFilter=@system-service\n"
    "SystemCallFilter=~@mount @swap @reboot @module @obsolete @cpu-emulation\n"
    "SystemCallErrorNumber=EPERM\n"
    "# oom_score_adj below 0 (SYS_RESOURCE), other users' /proc entries, ttys and\n"
    "# cgroups (DAC_*, FOWNER, SYS_PTRACE: exe links, kcmp), signals (KILL),\n"
    "# process events (NET_ADMIN), /dev/kmsg (SYSLOG), hooks as their users (SETUID, SETGID),\n"
    "# the socket's group (CHOWN).\n"
    "CapabilityBoundingSet=CAP_SYS_RESOURCE CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER "
    "CAP_SYS_PTRACE CAP_KILL CAP_NET_ADMIN CAP_SYSLOG CAP_SETUID CAP_SETGID CAP_CHOWN\n"
)


def render_units(
    config: Config,
    ram_bytes: int,
    app_uid: int | None,
    *,
    exec_start: str = DEFAULT_EXEC,
    classes: tuple[PolicyClass, ...] | None = None,
) -> dict[str, str]:
    """Every file for a systemd host: absolute path -> text.

    - the app slice, MemoryMax = RAM - layout.system_reserve;
    - a drop-in per service in layout.services: Slice= the app slice and
      OOMScoreAdjust= from the policy;
    - oomguard.service, outside the app slice, OOMScoreAdjust=-1000, with a
      MemoryMin= reservation, and a system.slice drop-in that reserves the
      same amount there (a cgroup's memory.min only protects as far as its
      ancestors' does);
    - a drop-in for user-UID.slice of the app user, since logind puts
      sessions there whatever slice we would like (skipped if app_uid is None).
    """
    if classes is None:
        from oomguard.policy.rules import (
            classes_for,  # local: policy imports this module lazily too
        )

        classes = classes_for(config)
    lay = config.layout
    limit = app_limit(config, ram_bytes)
    files: dict[str, str] = {}
    files[f"{UNIT_DIR}/{lay.app_slice}"] = (
        HEADER
        + "[Unit]\n"
        + f"Description=oomguard: processes of the app user {lay.app_user}, limited to RAM minus the system reserve\n"
        + "Before=slices.target\n"
        + "\n[Slice]\n"
        + "MemoryAccounting=yes\n"
        + f"MemoryMax={limit}\n"
    )
    for service in lay.services:
        value = service_value(service, classes)
        text = HEADER + "[Service]\n" + f"Slice={lay.app_slice}\n"
        if value is not None:
            text += f"OOMScoreAdjust={value}\n"
        files[f"{UNIT_DIR}/{service}.d/{DROPIN_NAME}"] = text
    files[f"{UNIT_DIR}/oomguard.service"] = (
        HEADER
        + "[Unit]\n"
        + "Description=oomguard: protected runs, service priorities, auto-healer and OOM forensics\n"
        + "Documentation=man:oomguard(8) man:oom-protect(1)\n"
        + "After=local-fs.target dbus.service\n"
        + "\n[Service]\n"
        + "# READY=1 once the socket listens and the policy is applied; keep-alives\n"
        + "# only while the healer ticks, so a wedged healer is restarted.\n"
        + "Type=notify\n"
        + "NotifyAccess=main\n"
        + "WatchdogSec=60s\n"
        + f"ExecStart={exec_start} daemon\n"
        + "# SIGHUP: reload the config, keep the old one if the new one is invalid\n"
        + "ExecReload=/bin/kill -HUP $MAINPID\n"
        + "Restart=always\n"
        + "RestartSec=1s\n"
        + "# Outside the app slice, never an OOM victim, with memory of its own;\n"
        + "# at -1000 a leak of its own must not take the box.\n"
        + "Slice=system.slice\n"
        + "OOMScoreAdjust=-1000\n"
        + "MemoryAccounting=yes\n"
        + f"MemoryMin={lay.daemon_memory_min}\n"
        + "MemoryHigh=256M\n"
        + "MemoryMax=512M\n"
        + "TasksMax=256\n"
        + "# Ahead of the shop for the CPU: an oversubscribed box must not delay the policy.\n"
        + "CPUWeight=1000\n"
        + "Nice=-5\n"
        + "RuntimeDirectory=oomguard\n"
        + "RuntimeDirectoryPreserve=yes\n"
        + "StateDirectory=oomguard\n"
        + HARDENING
        + "\n[Install]\n"
        + "WantedBy=multi-user.target\n"
    )
    files[f"{UNIT_DIR}/system.slice.d/{DROPIN_NAME}"] = (
        HEADER
        + "# memory.min is only as good as the ancestors': reserve the daemon's share here too.\n"
        + "[Slice]\n"
        + "MemoryAccounting=yes\n"
        + f"MemoryMin={lay.daemon_memory_min}\n"
    )
    if app_uid is not None:
        files[f"{UNIT_DIR}/user-{app_uid}.slice.d/{DROPIN_NAME}"] = (
            HEADER
            + f"# logind puts {lay.app_user}'s sessions here, not in {lay.app_slice}.\n"
            + "[Slice]\n"
            + "MemoryAccounting=yes\n"
            + f"MemoryMax={limit}\n"
        )
    return files


# ---------------------------------------------------------------- no systemd


@dataclass(frozen=True)
class Step:
    """One cgroupfs change for a host without systemd."""

    kind: str  # "enable", "create", "limit"
    cgroup: str
    value: str

    def describe(self) -> str:
        where = cgroups.path(self.cgroup)
        if self.kind == "enable":
            return f"write {where}/cgroup.subtree_control: {self.value}"
        if self.kind == "create":
            return f"mkdir {where}"
        return f"write {where}/memory.max: {self.value}"


def render_cgroup_steps(config: Config, ram_bytes: int) -> list[Step]:
    """The app cgroup with memory.max, the memory controller enabled on the
    way down. Pure: describes, does not touch."""
    target = cgroups.normalize(config.layout.app_cgroup)
    parts = target.strip("/").split("/")
    steps = []
    parent = "/"
    for i, _part in enumerate(parts):
        child = "/" + "/".join(parts[: i + 1])
        steps.append(Step("enable", parent, "+memory"))
        steps.append(Step("create", child, ""))
        parent = child
    steps.append(Step("limit", target, str(app_limit(config, ram_bytes))))
    return steps


def apply_cgroup_steps(steps: list[Step]) -> None:
    for s in steps:
        if s.kind == "enable":
            cgroups.enable_controllers(s.cgroup, ["memory"])
        elif s.kind == "create":
            cgroups.create(s.cgroup)
        elif s.kind == "limit":
            cgroups.set_memory_max(s.cgroup, int(s.value))


# ---------------------------------------------------------------- the command


def ram_bytes() -> int:
    return procfs.meminfo()["MemTotal"]


def app_uid_of(config: Config) -> int | None:
    return users.uid_of(config.layout.app_user)


def default_exec() -> str:
    """The oomguard script beside this interpreter (a venv's, say); PATH
    lookups can find shims that need a login environment."""
    beside = Path(sys.executable).with_name("oomguard")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("oomguard") or DEFAULT_EXEC


def apply_layout(
    config: Config,
    *,
    dry_run: bool = False,
    root: str | os.PathLike[str] | None = None,
    systemd: bool | None = None,
    ram: int | None = None,
    app_uid: int | None = AUTO,
    exec_start: str | None = None,
    run: Runner | None = None,
    out: TextIO | None = None,
) -> dict[str, str] | list[Step]:
    """Do (or with dry_run, print) the layout; returns what it rendered.

    ``root``: write the unit files under this directory and do nothing else
    (for images and for review); implies the systemd layout. Without it the
    host decides: systemd units and ``systemctl daemon-reload`` +
    ``enable --now oomguard.service``, or the app cgroup. Services keep
    their old slice until they restart; setup does not restart them."""
    out = out or sys.stdout
    ram = ram if ram is not None else ram_bytes()
    uid = app_uid_of(config) if app_uid == AUTO else app_uid
    if systemd is None:
        systemd = True if root is not None else has_systemd()
    if not systemd:
        steps = render_cgroup_steps(config, ram)
        if dry_run:
            out.write("# no systemd: the app cgroup, directly in cgroup v2\n")
            for s in steps:
                out.write(s.describe() + "\n")
            out.write(f"# then `oomguard daemon` moves {config.layout.app_user}'s new processes into it\n")
        else:
            if not cgroups.is_v2():
                raise SetupError(f"{cgroups.ROOT} is not a cgroup v2 mount")
            apply_cgroup_steps(steps)
            out.write(f"created {cgroups.path(config.layout.app_cgroup)} with memory.max={steps[-1].value}\n")
        return steps
    files = render_units(config, ram, uid, exec_start=exec_start or default_exec())
    if root is None and os.path.exists(VENDOR_UNIT):
        # The package's unit stays in charge; a drop-in, not a copy, changes it.
        del files[f"{UNIT_DIR}/oomguard.service"]
        out.write(f"# the daemon's unit is the package's {VENDOR_UNIT}\n")
    if uid is None:
        out.write(f"# note: user {config.layout.app_user!r} does not exist; no user slice drop-in\n")
    if dry_run:
        for path, text in sorted(files.items()):
            shown = Path(root, path.lstrip("/")) if root else path
            out.write(f"==> {shown} <==\n{text}\n")
        return files
    changes = write_files(files, root)
    for c in changes:
        out.write(c.line() + "\n")
    changed = any(c.action != "unchanged" for c in changes)
    if not changed:
        out.write("nothing changed\n")
    if root is None:
        if changed:
            daemon_reload(run)
        enable_now("oomguard.service", run)
        if changed:
            out.write(
                "restart " + " ".join(config.layout.services)
                + " when convenient to move them into " + config.layout.app_slice + "\n"
            )
    return files


def remove_layout(
    config: Config,
    *,
    root: str | os.PathLike[str] | None = None,
    app_uid: int | None = AUTO,
    run: Runner | None = None,
    out: TextIO | None = None,
) -> None:
    """`oomguard setup --uninstall`: stop and disable the daemon, remove every
    unit file setup writes (putting back what they replaced), daemon-reload.
    Services leave the app slice when they next restart."""
    out = out or sys.stdout
    if root is None and not has_systemd():
        cg = config.layout.app_cgroup
        if cgroups.exists(cg) and not cgroups.remove(cg):
            raise SetupError(f"{cgroups.path(cg)} still holds processes; move or stop them first")
        out.write(f"removed {cgroups.path(cg)}\n")
        return
    uid = app_uid_of(config) if app_uid == AUTO else app_uid
    paths = list(render_units(config, 1 << 40, uid, exec_start=DEFAULT_EXEC, classes=()))
    if root is None:
        disable_now("oomguard.service", run)
    for c in remove_files(paths, root):
        out.write(c.line() + "\n")
    if root is None:
        daemon_reload(run)
        out.write(
            "restart " + " ".join(config.layout.services)
            + " when convenient to move them out of " + config.layout.app_slice + "\n"
        )
