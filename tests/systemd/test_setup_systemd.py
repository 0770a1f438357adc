"""`oomguard setup` under a real systemd: units, daemon-reload, the daemon, the shop's units.

One module-scoped installation (setup + the three Debian units started) is
shared by the tests in order; the finalizer stops everything and removes
what setup wrote, so later test modules see the boot's original state.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from systemd_tools import (
    UNIT_DIR,
    cgroup_of,
    main_pid,
    oom_score_adj,
    oomguard,
    run,
    setup_installed,
    systemctl,
    unit_property,
    wait_until,
)

SERVICES = ("nginx.service", "php8.2-fpm.service", "mariadb.service")
APP_SLICE = "oomguard-app.slice"
APP_CGROUP = "/oomguard.slice/oomguard-app.slice"  # dashes nest in slice names
# OOMScoreAdjust= of each service's main process: the default policy's classes
MAIN_VALUES = {"nginx.service": -800, "php8.2-fpm.service": -900, "mariadb.service": -1000}
# what the running daemon writes on the workers (default policy)
WORKER_VALUES = {"nginx.service": 0, "php8.2-fpm.service": 200}


def written_paths(output: str) -> list[Path]:
    return [
        Path(line.split(" ", 1)[1]) for line in output.splitlines() if line.startswith("wrote ")
    ]


def contents(paths: list[Path]) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths}


@pytest.fixture(scope="module")
def installed():
    """`oomguard setup`, then the shop's units started (they take the new slice at start)."""
    with setup_installed(*SERVICES) as result:
        yield result


def test_setup_writes_the_slice_the_dropins_and_the_daemon_unit(installed):
    wrote = set(written_paths(installed.stdout))
    expected = {
        UNIT_DIR / APP_SLICE,
        UNIT_DIR / "oomguard.service",
        UNIT_DIR / "system.slice.d/oomguard.conf",
        *(UNIT_DIR / f"{s}.d/oomguard.conf" for s in SERVICES),
    }
    assert expected <= wrote, installed.stdout
    for path in expected:
        assert path.read_text().startswith("# Written by `oomguard setup`"), path


def test_systemd_loaded_the_units_after_daemon_reload(installed):
    assert unit_property("oomguard.service", "NeedDaemonReload") == "no"
    for service in SERVICES:
        assert unit_property(service, "Slice") == APP_SLICE, service
        assert unit_property(service, "DropInPaths") == str(UNIT_DIR / f"{service}.d/oomguard.conf")
    assert unit_property(APP_SLICE, "ControlGroup") == APP_CGROUP
    limit = int(unit_property(APP_SLICE, "MemoryMax"))
    ram = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    assert limit == ram - (512 << 20)


def test_the_daemon_is_enabled_and_active_outside_the_app_slice_at_minus_1000(installed):
    assert systemctl("is-enabled", "oomguard.service").stdout.strip() == "enabled"
    wait_until(
        lambda: unit_property("oomguard.service", "ActiveState") == "active", "oomguard.service"
    )
    pid = main_pid("oomguard.service")
    assert cgroup_of(pid) == "/system.slice/oomguard.service"
    assert oom_score_adj(pid) == -1000
    limit = Path("/sys/fs/cgroup/system.slice/oomguard.service/memory.min").read_text()
    assert int(limit) == 64 << 20
    wait_until(lambda: os.path.exists("/run/oomguard/protect.sock"), "the broker socket")


@pytest.mark.parametrize("service", SERVICES)
def test_the_shops_units_run_in_the_app_slice_with_their_policy_value(installed, service):
    assert unit_property(service, "ActiveState") == "active"
    pid = main_pid(service)
    assert cgroup_of(pid) == f"{APP_CGROUP}/{service}"
    assert oom_score_adj(pid) == MAIN_VALUES[service]
    memory_max = Path(f"/sys/fs/cgroup{APP_CGROUP}/memory.max").read_text().strip()
    assert memory_max == unit_property(APP_SLICE, "MemoryMax")


@pytest.mark.parametrize("service", sorted(WORKER_VALUES))
def test_the_daemon_gives_the_workers_their_class_value(installed, service):
    cgroup = Path(f"/sys/fs/cgroup{APP_CGROUP}/{service}/cgroup.procs")

    def workers_done() -> bool:
        try:
            workers = [int(p) for p in cgroup.read_text().split() if int(p) != main_pid(service)]
            return bool(workers) and all(
                oom_score_adj(p) == WORKER_VALUES[service] for p in workers
            )
        except (ProcessLookupError, FileNotFoundError):  # a worker replaced meanwhile
            return False

    wait_until(workers_done, f"{service}'s workers at {WORKER_VALUES[service]}", timeout=60)


def test_rerunning_setup_leaves_the_files_and_the_running_services_as_they_were(installed):
    paths = written_paths(installed.stdout)
    before = contents(paths), {u: main_pid(u) for u in ("oomguard.service", *SERVICES)}
    again = oomguard("setup")
    assert written_paths(again.stdout) == []
    said = [line for line in again.stdout.splitlines() if line.startswith(("unchanged ", "nothing"))]
    assert sorted(said) == sorted([f"unchanged {p}" for p in paths] + ["nothing changed"])
    after = contents(paths), {u: main_pid(u) for u in ("oomguard.service", *SERVICES)}
    assert after == before
    assert unit_property("oomguard.service", "ActiveState") == "active"


# ---------------------------------------------------------------- the daemon as a notify service


def test_the_daemon_is_a_sandboxed_notify_service_that_said_it_is_ready(installed):
    props = {p: unit_property("oomguard.service", p) for p in (
        "Type", "NotifyAccess", "WatchdogUSec", "StatusText", "ProtectSystem", "ProtectHome",
        "PrivateTmp", "CapabilityBoundingSet", "TasksMax", "MemoryHigh", "Documentation")}
    assert (props["Type"], props["NotifyAccess"], props["WatchdogUSec"]) == ("notify", "main", "1min"), props
    # STATUS= comes with READY=1, sent once the socket listens and the policy is applied
    assert props["StatusText"] == "serving /run/oomguard/protect.sock", props
    assert (props["ProtectSystem"], props["ProtectHome"]) == ("full", "read-only")
    caps = set(props["CapabilityBoundingSet"].split())
    assert {"cap_sys_resource", "cap_kill", "cap_net_admin", "cap_syslog"} <= caps
    assert not caps & {"cap_sys_admin", "cap_sys_module", "cap_sys_time", "cap_sys_boot"}, caps
    assert props["TasksMax"] == "256" and int(props["MemoryHigh"]) == 256 << 20
    assert "man:oomguard(8)" in props["Documentation"]
    # the sandbox leaves the daemon its kernel feeds: process events, not polling
    status = json.loads(oomguard("status", "--json").stdout)
    assert status["daemon"]["process_events"] == "events", status["daemon"]


def test_events_pages_come_from_the_reader_process_inside_the_sandbox(installed):
    """The sandboxed unit lets the daemon start its event reader: a child in
    the service's cgroup, niced, not -1000, while the daemon stays -1000."""
    daemon = main_pid("oomguard.service")
    json.loads(oomguard("events", "--json", "--since", "1d").stdout)
    procs = Path("/sys/fs/cgroup", cgroup_of(daemon).lstrip("/"), "cgroup.procs").read_text().split()
    readers = [int(p) for p in procs
               if b"oomguard.forensics.eventreader" in Path(f"/proc/{p}/cmdline").read_bytes()]  # fmt: skip
    assert len(readers) == 1, procs
    (reader,) = readers
    assert int(Path(f"/proc/{reader}/stat").read_text().rsplit(")", 1)[1].split()[1]) == daemon  # its parent
    # below the daemon's own priority (the unit's Nice=), by the reader's 10
    assert os.getpriority(os.PRIO_PROCESS, reader) == os.getpriority(os.PRIO_PROCESS, daemon) + 10
    assert (oom_score_adj(reader), oom_score_adj(daemon)) == (0, -1000)


def test_reload_keeps_the_process_and_says_so(installed):
    pid = main_pid("oomguard.service")
    systemctl("reload", "oomguard.service")
    wait_until(lambda: unit_property("oomguard.service", "StatusText").endswith("(reloaded)"), "the reload")
    assert main_pid("oomguard.service") == pid
    assert unit_property("oomguard.service", "ActiveState") == "active"


def test_a_frozen_daemon_is_restarted_by_the_watchdog_and_a_live_one_is_not(installed):
    dropin = Path("/run/systemd/system/oomguard.service.d/watchdog.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text("[Service]\nWatchdogSec=4s\nTimeoutAbortSec=3s\n")  # SIGABRT cannot end a stopped process
    try:
        systemctl("daemon-reload")
        systemctl("restart", "oomguard.service")  # blocks until READY=1
        pid = main_pid("oomguard.service")
        restarts = int(unit_property("oomguard.service", "NRestarts"))
        time.sleep(10)  # 2.5 periods: only keep-alives keep it
        assert main_pid("oomguard.service") == pid and unit_property("oomguard.service", "ActiveState") == "active"
        os.kill(pid, signal.SIGSTOP)  # no tick, no keep-alive
        wait_until(lambda: main_pid("oomguard.service") not in (0, pid)
                   and unit_property("oomguard.service", "ActiveState") == "active",
                   "the watchdog's restart", timeout=120)  # fmt: skip
        assert int(unit_property("oomguard.service", "NRestarts")) == restarts + 1
        assert unit_property("oomguard.service", "StatusText") == "serving /run/oomguard/protect.sock"
        journal = run(["journalctl", "-u", "oomguard.service", "--no-pager", "-o", "cat"]).stdout
        assert "Watchdog timeout" in journal, journal[-2000:]
    finally:
        dropin.unlink(missing_ok=True)
        systemctl("daemon-reload")
        systemctl("restart", "oomguard.service")


def test_the_daemons_events_reach_the_journal_with_their_message_id_and_fields(installed):
    from oomguard.host import journal

    with socket.socket(socket.AF_UNIX) as s:  # root is no login user: refused, and recorded
        s.settimeout(30)
        s.connect("/run/oomguard/protect.sock")
        s.sendall(b'{"op": "protect"}\n')
        assert json.loads(s.makefile("rb").readline())["ok"] is False

    def entries():
        out = run(["journalctl", "--no-pager", "-o", "json", "-u", "oomguard.service",
                   f"MESSAGE_ID={journal.MESSAGE_IDS['refusal']}"]).stdout  # fmt: skip
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    entry = wait_until(entries, "the refusal in the journal")[-1]
    assert entry["OOMGUARD_EVENT"] == "refusal" and entry["OOMGUARD_UID"] == "0", entry
    assert entry["MESSAGE"].startswith("event refusal:") and entry["PRIORITY"] == "6"


def test_doctor_under_systemd_sees_the_layout_and_another_oom_killers_unit(installed):
    def findings():
        return json.loads(oomguard("doctor", "--json", check=False).stdout)

    layout = {f["text"].split()[0]: f["level"] for f in findings() if f["topic"] == "layout"}
    assert layout == {s: "ok" for s in SERVICES}, layout
    fake = Path("/run/systemd/system/earlyoom.service")  # a stand-in for Debian's unit
    fake.write_text("[Service]\nExecStart=/bin/sleep infinity\n")
    try:
        systemctl("daemon-reload")
        systemctl("start", "earlyoom.service")
        warned = [f for f in findings() if f["topic"] == "oom-killers" and "earlyoom.service" in f["text"]]
        assert warned and warned[0]["level"] == "warn", findings()
    finally:
        systemctl("stop", "earlyoom.service", check=False)
        fake.unlink(missing_ok=True)
        systemctl("daemon-reload")


def test_uninstall_stops_the_daemon_and_removes_what_setup_wrote(installed):
    """Last in this module: it undoes the installation."""
    paths = written_paths(installed.stdout)
    out = oomguard("setup", "--uninstall").stdout
    assert sorted(line for line in out.splitlines() if line.startswith("removed ")) == sorted(
        f"removed {p}" for p in paths)  # fmt: skip
    assert not any(p.exists() for p in paths)
    assert unit_property("oomguard.service", "ActiveState") == "inactive"
    assert systemctl("is-enabled", "oomguard.service", check=False).stdout.strip() != "enabled"
    assert unit_property("nginx.service", "DropInPaths") == ""
    systemctl("restart", "nginx.service")  # a restart takes it out of the app slice
    assert cgroup_of(main_pid("nginx.service")) == "/system.slice/nginx.service"
