"""The Debian package as an operator uses it, with real apt, dpkg and systemd.

In order, sharing one installation: ``apt-get install ./oomguard_*.deb``
(the image's policy-rc.d forbids starting services: nothing starts), then
``oomguard setup`` (the package's unit stays the one in /lib, the layout goes
into /etc), then the app user's ``oom-protect`` from a login shell gets
-1000 from the packaged daemon; ``systemctl reload`` picks up a drop-in; an
upgrade to the next build (policy-rc.d out of the way, as on a server)
restarts the daemon and keeps the events and the runs; ``apt-get remove``
stops it and keeps the configuration, and ``apt-get purge`` leaves nothing.

The two .debs are built on the host before the boot (conftest.build_debs):
this tree's and the same tree one version up.  Every command here is the
package's (/usr/bin), never the test venv's, run with a root login's
environment.  The module's finalizer purges whatever is left and puts back
policy-rc.d, so later modules see the boot as it was.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from systemd_tools import (
    DEBS_ENV,
    NEXT_SUFFIX,
    UNIT_DIR,
    main_pid,
    oom_score_adj,
    run,
    systemctl,
    unit_property,
    wait_until,
)

OOMGUARD = "/usr/bin/oomguard"
VENDOR_UNIT = Path("/lib/systemd/system/oomguard.service")
ETC = Path("/etc/oomguard")
DROPINS = ETC / "oomguard.toml.d"
STATE = Path("/var/lib/oomguard")
RUNTIME = Path("/run/oomguard")
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
MAN_DB_AUTO_UPDATE = Path("/var/lib/man-db/auto-update")
HEADER = "# Written by `oomguard setup`; rerunning it overwrites this file.\n"
SERVICES = ("nginx.service", "php8.2-fpm.service", "mariadb.service")
APP_SLICE = "oomguard-app.slice"
# An admin's own drop-in where setup writes one: set aside by setup, put back by purge.
ADMINS = UNIT_DIR / "mariadb.service.d/oomguard.conf"
ADMINS_TEXT = "[Service]\n# the admin's, not oomguard's\nLimitNOFILE=65536\n"
# A root login's environment: no venv on PATH, no PYTHON* variables.
ROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb", "DEBIAN_FRONTEND": "noninteractive",
}  # fmt: skip
FIGURES: dict[str, float] = {}


def root(argv: list[str], check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """``argv`` as root with a root login's environment; logged with its
    output and time to <results>/package-commands.log (what apt said)."""
    started = time.monotonic()
    proc = run(argv, check=False, timeout=timeout, env=ROOT_ENV)
    if results := os.environ.get("OOMGUARD_GUEST_RESULTS"):
        with open(Path(results) / "package-commands.log", "a") as log:
            log.write(f"$ {shlex.join(map(str, argv))}  # {time.monotonic() - started:.1f} s, exit {proc.returncode}\n"
                      f"{proc.stdout}{proc.stderr}\n")  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    return proc


def timed(name: str, argv: list[str]) -> subprocess.CompletedProcess:
    started = time.monotonic()
    proc = root(argv)
    FIGURES[name] = time.monotonic() - started
    return proc


def apt_get(*args: str) -> list[str]:
    # Offline, as the package's dependencies are on the image: no sources at
    # all, so apt can fetch nothing (and reads no package lists, ~40 s each
    # time under TCG).  --no-download would break a local .deb (apt 2.6:
    # "Pathname to install is not absolute").
    return ["apt-get", "-y", "-q", "-o", "Dpkg::Use-Pty=0", "-o", "Dir::Etc::SourceList=/dev/null",
            "-o", "Dir::Etc::SourceParts=/dev/null", *args]  # fmt: skip


def package_status() -> str:
    proc = root(["dpkg-query", "-W", "-f", "${Status} ${Version}", "oomguard"], check=False)
    return proc.stdout.strip() if proc.returncode == 0 else "not known to dpkg"


def protect_as(user: str, session: bool = False) -> subprocess.CompletedProcess:
    """``oom-protect`` as the app user types it, in a login shell (PATH from
    /etc/profile); ``session``: a real PAM login with a logind session (which
    starts the user's systemd, ~15 s under TCG, so only once)."""
    line = 'command -v oom-protect; oom-protect sh -c "cat /proc/self/oom_score_adj"'
    argv = ["runuser", "-l", user, "-c", line] if session else ["runuser", "-u", user, "--", "bash", "-lc", line]
    return run(argv, check=False, timeout=120)


def reloads() -> int:
    out = root(["journalctl", "-b", "-u", "oomguard.service", "-o", "cat", "--no-pager"]).stdout
    return out.count("config reloaded from")


def ours(path: Path) -> bool:
    try:
        return path.is_file() and path.read_text().startswith(HEADER)
    except OSError:
        return False


def leftovers() -> list[str]:
    """What of oomguard's is still on the host: files and units."""
    found = [str(p) for p in (VENDOR_UNIT, ETC, STATE, RUNTIME, Path(OOMGUARD)) if p.exists()]
    found += [str(p) for p in UNIT_DIR.rglob("*")
              if ours(p) or ("oomguard" in p.name and not p.name.startswith("oomguard-test"))]  # fmt: skip
    units = systemctl("list-units", "--all", "--plain", "--no-legend", "oomguard*").stdout.split("\n")
    found += [u for u in units if u.strip() and not u.startswith("oomguard-test")]
    return found


@pytest.fixture(scope="module")
def debs() -> dict[str, Path]:
    where = os.environ.get(DEBS_ENV)
    assert where, f"{DEBS_ENV} is not set: the host did not build the .debs (tests/systemd/conftest.py)"
    error = Path(where, "build-error.txt")
    assert not error.exists(), error.read_text()
    found = {name: sorted(Path(where, name).glob("oomguard_*_all.deb")) for name in ("previous", "next")}
    assert all(len(v) == 1 for v in found.values()), found
    return {name: v[0] for name, v in found.items()}


@pytest.fixture(scope="module")
def guest(debs, app_user):
    """A fresh server's state for the package; the boot as the module found it afterwards."""
    assert package_status() == "not known to dpkg"
    assert systemctl("is-active", "oomguard.service", check=False).stdout.strip() != "active"
    assert POLICY_RC_D.read_text().strip().endswith("exit 101"), "the image's policy-rc.d changed"
    policy = POLICY_RC_D.read_bytes()
    before = set(UNIT_DIR.rglob("*"))
    # earlier modules' daemons (the venv's) leave their state and runtime
    # dirs: set aside (renamed, a socket cannot be copied), put back after
    moved = {p: p.with_name(p.name + ".package-test-saved") for p in (STATE, RUNTIME, ETC) if p.exists()}
    for p, to in moved.items():
        p.rename(to)
    try:
        assert leftovers() == [], leftovers()
        # apt's DPkg::Post-Invoke asks PackageKit over D-Bus, which would start
        # packagekitd in this shared boot: nothing to do with oomguard.
        systemctl("mask", "--runtime", "packagekit.service")
        # man-db's trigger re-indexes /usr/share/man (18,000 pages in man1
        # alone): minutes over 9p under TCG.  Its own switch turns it off;
        # the pages themselves are checked in tests/unit/test_package.py.
        if MAN_DB_AUTO_UPDATE.exists():
            MAN_DB_AUTO_UPDATE.rename(MAN_DB_AUTO_UPDATE.with_name("auto-update.package-test-saved"))
        yield
    finally:
        if package_status() != "not known to dpkg":
            root(["dpkg", "--purge", "oomguard"], check=False)
        systemctl("stop", "oomguard.service", check=False)
        for p in sorted(set(UNIT_DIR.rglob("*")) - before, reverse=True):
            p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
        for p in (ETC, STATE, RUNTIME):
            shutil.rmtree(p, ignore_errors=True)
        for p, to in moved.items():
            to.rename(p)
        if (man := MAN_DB_AUTO_UPDATE.with_name("auto-update.package-test-saved")).exists():
            man.rename(MAN_DB_AUTO_UPDATE)
        POLICY_RC_D.write_bytes(policy)
        POLICY_RC_D.chmod(0o755)
        systemctl("unmask", "--runtime", "packagekit.service", check=False)
        systemctl("daemon-reload")
        systemctl("reset-failed", check=False)
        figures = os.environ.get("OOMGUARD_GUEST_RESULTS")
        if figures and FIGURES:
            with open(Path(figures) / "figures.txt", "a") as f:
                f.writelines(f"package_{k} {v:.1f}\n" for k, v in FIGURES.items())
        print("\nFIGURE package in the guest: " + ", ".join(f"{k} {v:.1f}" for k, v in FIGURES.items()))


def test_apt_installs_the_deb_offline_and_starts_nothing_where_policy_rc_d_forbids(guest, debs):
    deb = debs["previous"]
    FIGURES["deb_kib"] = deb.stat().st_size / 1024
    version = root(["dpkg-deb", "-f", str(deb), "Version"]).stdout.strip()
    timed("install_s", apt_get("install", str(deb)))
    assert package_status() == f"install ok installed {version}"
    for path in (OOMGUARD, "/usr/bin/oom-protect", "/usr/bin/hypernode-oom-protect", VENDOR_UNIT,
                 ETC / "oomguard.toml", "/usr/share/man/man8/oomguard.8.gz"):  # fmt: skip
        assert Path(path).exists(), path
    assert root([OOMGUARD, "--version"]).stdout.startswith("oomguard ")
    # the package enabled its unit; policy-rc.d (exit 101) kept it from starting it
    assert systemctl("is-enabled", "oomguard.service").stdout.strip() == "enabled"
    assert unit_property("oomguard.service", "FragmentPath") == str(VENDOR_UNIT)
    assert unit_property("oomguard.service", "ActiveState") == "inactive"


def test_setup_writes_the_layout_and_leaves_the_daemons_unit_to_the_package(guest, app_user):
    DROPINS.joinpath("10-site.toml").write_text(f'[layout]\napp_user = "{app_user.name}"\n')
    ADMINS.parent.mkdir()
    ADMINS.write_text(ADMINS_TEXT)
    out = timed("setup_s", [OOMGUARD, "setup"]).stdout
    assert ADMINS.with_name("oomguard.conf.oomguard-saved").read_text() == ADMINS_TEXT
    assert f"# the daemon's unit is the package's {VENDOR_UNIT}" in out, out
    wrote = {line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("wrote ")}
    assert wrote == {
        str(UNIT_DIR / APP_SLICE),
        str(UNIT_DIR / "system.slice.d/oomguard.conf"),
        str(UNIT_DIR / f"user-{app_user.uid}.slice.d/oomguard.conf"),
        *(str(UNIT_DIR / f"{s}.d/oomguard.conf") for s in SERVICES),
    }, out
    # no copy of the unit in /etc: the package's stays in charge
    assert not (UNIT_DIR / "oomguard.service").exists()
    assert unit_property("oomguard.service", "FragmentPath") == str(VENDOR_UNIT)
    assert unit_property("oomguard.service", "DropInPaths") == ""
    wait_until(lambda: unit_property("oomguard.service", "ActiveState") == "active", "oomguard.service")
    pid = main_pid("oomguard.service")
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:3] == [b"/usr/bin/python3", b"/usr/bin/oomguard", b"daemon"]
    assert oom_score_adj(pid) == -1000
    wait_until(lambda: (RUNTIME / "protect.sock").exists(), "the broker socket")


def test_the_app_users_oom_protect_gets_minus_1000_from_the_packaged_daemon(guest, app_user):
    proc = protect_as(app_user.name, session=True)
    assert (proc.returncode, proc.stdout.split()) == (0, ["/usr/bin/oom-protect", "-1000"]), proc


def test_reload_picks_up_a_dropin(guest, app_user):
    pid, before = main_pid("oomguard.service"), reloads()
    deny = DROPINS / "50-deny.toml"
    deny.write_text('[protect]\nallow_users = ["nobody"]\n')
    try:
        shown = json.loads(root([OOMGUARD, "config", "show", "--json"]).stdout)
        assert {v["key"]: v["from"] for v in shown["values"]}["protect.allow_users"] == str(deny)
        systemctl("reload", "oomguard.service")
        wait_until(lambda: reloads() == before + 1, "'config reloaded' in the daemon's log")
        proc = protect_as(app_user.name)
        assert proc.returncode == 125 and "-1000" not in proc.stdout, proc  # refused: CMD not run
    finally:
        deny.unlink()
    systemctl("reload", "oomguard.service")
    wait_until(lambda: reloads() == before + 2, "the second reload")
    assert protect_as(app_user.name).stdout.split()[-1:] == ["-1000"]
    assert main_pid("oomguard.service") == pid  # a reload, not a restart


def test_an_upgrade_restarts_the_daemon_and_keeps_the_events_and_the_runs(guest, debs, app_user):
    events = json.loads(root([OOMGUARD, "events", "--json"]).stdout)
    runs = json.loads(root([OOMGUARD, "runs", "--all", "--json"]).stdout)
    kinds = {e["kind"] for e in events}
    assert {"grant", "refusal", "run_end"} <= kinds and len(runs) == 2, (kinds, runs)  # the two runs above
    layout = {p: p.read_bytes() for p in UNIT_DIR.rglob("*") if ours(p)}
    pid = main_pid("oomguard.service")
    POLICY_RC_D.unlink()  # a server has none: the maintainer scripts may restart
    timed("upgrade_s", apt_get("install", str(debs["next"])))
    assert package_status().startswith("install ok installed") and package_status().endswith(NEXT_SUFFIX)
    wait_until(lambda: unit_property("oomguard.service", "ActiveState") == "active", "the restarted daemon")
    assert main_pid("oomguard.service") not in (0, pid)
    wait_until(lambda: (RUNTIME / "protect.sock").exists(), "the broker socket")
    after_events = json.loads(root([OOMGUARD, "events", "--json"]).stdout)
    after_runs = json.loads(root([OOMGUARD, "runs", "--all", "--json"]).stdout)
    assert after_events[: len(events)] == events
    assert [r for r in after_runs if r["id"] in {r["id"] for r in runs}] == runs
    # the admin's drop-in and setup's layout are as they were; runs go on
    assert (DROPINS / "10-site.toml").exists()
    assert {p: p.read_bytes() for p in UNIT_DIR.rglob("*") if ours(p)} == layout
    assert protect_as(app_user.name).stdout.split()[-1:] == ["-1000"]


def test_remove_stops_the_daemon_and_keeps_the_configuration(guest):
    layout = [p for p in UNIT_DIR.rglob("*") if ours(p)]
    timed("remove_s", apt_get("remove", "oomguard"))
    assert package_status().startswith("deinstall ok config-files")
    assert not Path(OOMGUARD).exists() and not VENDOR_UNIT.exists()
    assert unit_property("oomguard.service", "ActiveState") == "inactive"
    assert unit_property("oomguard.service", "LoadState") == "not-found"
    # configuration stays until purge (Debian Policy 10.7.3): the conffile,
    # the drop-ins, the event store, and the layout, which needs no daemon
    assert (ETC / "oomguard.toml").exists() and (DROPINS / "10-site.toml").exists()
    assert (STATE / "events.db").is_file() and (STATE / "runs.json").is_file()
    assert layout and all(ours(p) for p in layout)


def test_purge_leaves_no_unit_slice_dropin_or_state(guest, app_user):
    timed("purge_s", apt_get("purge", "oomguard"))
    assert package_status() == "not known to dpkg"
    assert leftovers() == [str(ADMINS)]  # the admin's drop-in, put back
    assert ADMINS.read_text() == ADMINS_TEXT and not ADMINS.with_name("oomguard.conf.oomguard-saved").exists()
    for service in SERVICES:
        assert unit_property(service, "DropInPaths") == (str(ADMINS) if ADMINS.parent.name == f"{service}.d" else ""), service
    assert "oomguard" not in unit_property(f"user-{app_user.uid}.slice", "DropInPaths")
    # systemd makes up any slice it is asked about: no file, no limit
    assert (unit_property(APP_SLICE, "FragmentPath"), unit_property(APP_SLICE, "MemoryMax")) == ("", "infinity")
    assert not list(Path("/var/lib/systemd/deb-systemd-helper-enabled").rglob("oomguard*"))
