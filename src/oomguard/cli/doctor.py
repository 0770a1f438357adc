"""`oomguard doctor`: what on this host would undermine oomguard's guarantees."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from oomguard.config import Config, ConfigError, load
from oomguard.host import cgroups, procfs

# Userspace OOM killers with rules of their own: a -1000 process is fair game
# for them (systemd-oomd kills whole cgroups whatever their oom_score_adj).
OTHER_KILLERS = {"systemd-oomd": "systemd-oomd", "earlyoom": "earlyoom", "nohang": "nohang",
                 "oomd": "oomd", "low-memory-monitor": "low-memory-monitor"}  # fmt: skip


@dataclass(frozen=True)
class Finding:
    level: str  # "ok", "warn", "error"
    topic: str
    text: str


def other_oom_killers() -> list[Finding]:
    found = []
    for p in procfs.iter_processes():
        name = os.path.basename(p.exe or "").removesuffix(" (deleted)")
        for comm, label in OTHER_KILLERS.items():
            if p.comm == comm[:15] or name == comm:
                found.append(Finding("warn", "oom-killers", f"{label} runs (pid {p.pid}): it kills by its own "
                                     "rules and may kill protected processes or whole cgroups"))  # fmt: skip
    return found or [Finding("ok", "oom-killers", "no other userspace OOM killer runs")]


def cgroup_checks() -> list[Finding]:
    if not cgroups.is_v2():
        return [Finding("error", "cgroups", f"{cgroups.ROOT} is not cgroup v2: no run cgroups, no app slice limits")]
    out = []
    ctl = cgroups.controllers("/")
    if "memory" not in ctl:
        out.append(Finding("error", "cgroups", "the memory controller is not available"))
    else:
        out.append(Finding("ok", "cgroups", "cgroup v2 with the memory controller"))
    swap_total = procfs.meminfo().get("SwapTotal", 0)
    accounting = cgroups.kernel_offers("memory.swap.max")
    if swap_total and not accounting:
        out.append(Finding("warn", "swap", "swap is on but not accounted per cgroup (boot with "
                           "swapaccount=1): the app slice can push its memory into swap unbounded"))  # fmt: skip
    elif swap_total:
        out.append(Finding("ok", "swap", "swap is accounted per cgroup"))
    if not cgroups.kernel_offers("cgroup.kill"):
        out.append(Finding("warn", "cgroups", "no cgroup.kill (kernel < 5.14): runs are killed pid by pid"))
    return out


def socket_checks(cfg: Config) -> list[Finding]:
    sock = Path(cfg.protect.socket)
    try:
        st = sock.lstat()
    except FileNotFoundError:
        return [Finding("warn", "socket", f"{sock} does not exist: is `oomguard daemon` running?")]
    out = []
    if not stat.S_ISSOCK(st.st_mode):
        out.append(Finding("error", "socket", f"{sock} is not a socket"))
    if st.st_uid != 0:
        out.append(Finding("error", "socket", f"{sock} is owned by uid {st.st_uid}, not root"))
    if st.st_mode & 0o777 != 0o666:
        out.append(Finding("warn", "socket", f"{sock} has mode {st.st_mode & 0o777:o}; allowed users need 666"))
    parent = sock.parent.stat()
    if parent.st_uid != 0 or parent.st_mode & 0o022:
        out.append(Finding("error", "socket", f"{sock.parent} is writable by others: the socket could be replaced"))
    elif parent.st_mode & 0o005 != 0o005:
        out.append(Finding("warn", "socket", f"{sock.parent} is not searchable by others: users cannot connect"))
    return out or [Finding("ok", "socket", f"{sock} is root's and reachable by every user")]


def config_checks(path: str | None) -> tuple[list[Finding], Config]:
    try:
        cfg = load(path)
    except ConfigError as e:
        return [Finding("error", "config", str(e))], Config()
    return [Finding("ok", "config", f"{cfg.source or 'no config file: defaults'} validates")], cfg


def process_event_checks() -> list[Finding]:
    from oomguard.host import procevents

    if procevents.available():
        return [Finding("ok", "events", "the process-event connector works: policy applies at exec")]
    return [Finding("warn", "events", "no process events (not root, or no connector): the policy is "
                    "applied by polling, and runs' exit statuses are unknown")]  # fmt: skip


KILLER_UNITS = ("systemd-oomd.service", "earlyoom.service", "nohang.service", "nohang-desktop.service")


def systemd_checks(cfg: Config, show=None) -> list[Finding]:
    """Under systemd: other OOM killers' units enabled or active, and the
    policy's services outside the app slice (they move at their next restart)."""
    from oomguard.host import systemd

    show = show or systemd.show
    out = []
    for unit in KILLER_UNITS:
        p = show(unit, "LoadState", "ActiveState", "UnitFileState")
        if p.get("LoadState") != "loaded":
            continue
        if p.get("ActiveState") in ("active", "activating", "reloading") or p.get("UnitFileState") == "enabled":
            out.append(Finding("warn", "oom-killers", f"{unit} is {p.get('ActiveState')} and "
                               f"{p.get('UnitFileState')}: it kills by its own rules, whatever oomguard protects; "
                               f"systemctl disable --now {unit}"))  # fmt: skip
    app = cgroups.slice_path(cfg.layout.app_slice)
    for unit in cfg.layout.services:
        p = show(unit, "LoadState", "ActiveState", "ControlGroup")
        if p.get("LoadState") != "loaded" or p.get("ActiveState") != "active":
            continue
        cg = p.get("ControlGroup", "")
        if not (cg == app or cg.startswith(app + "/")):
            out.append(Finding("warn", "layout", f"{unit} runs in {cg or '?'}, outside {cfg.layout.app_slice}: "
                               f"restart it to move it there (systemctl restart {unit})"))  # fmt: skip
        else:
            out.append(Finding("ok", "layout", f"{unit} runs in {cfg.layout.app_slice}"))
    return out


def run(path: str | None) -> list[Finding]:
    findings, cfg = config_checks(path)
    findings += socket_checks(cfg)
    findings += cgroup_checks()
    findings += other_oom_killers()
    findings += process_event_checks()
    if cgroups.systemd_booted():
        findings += systemd_checks(cfg)
    if not procfs.has_cap_sys_resource():
        findings.append(Finding("warn", "capability", "this process lacks CAP_SYS_RESOURCE: the daemon "
                                "cannot grant -1000 from here"))  # fmt: skip
    return findings
