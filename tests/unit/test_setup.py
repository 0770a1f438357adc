"""Setup: the rendered units, checked by systemd-analyze verify (which must
also reject a broken unit), the --dry-run / --root outputs, and the cgroup
layout for hosts without systemd on a staged cgroupfs."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from oomguard.cli import setup, unitfiles
from oomguard.config import Config, LayoutConfig, parse, parse_policy_class
from oomguard.host import cgroups

GIB = 1 << 30
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def config(**layout) -> Config:
    base = {"app_user": "nobody", "system_reserve": "1G", "daemon_memory_min": "96M"}
    base.update(layout)
    return parse({"layout": base})


def units(cfg: Config | None = None, ram: int = 8 * GIB, uid: int | None = 65534, **kw) -> dict[str, str]:
    return setup.render_units(cfg or config(), ram, uid, **kw)


def ini(text: str) -> dict[str, str]:
    """key -> value of a unit's assignments (ours have no repeated keys)."""
    return dict(re.findall(r"^(\w+)=(.*)$", text, re.M))


# ---------------------------------------------------------------- the rendered units


def test_the_app_slice_gets_ram_minus_the_reserve():
    files = units()
    d = ini(files["/etc/systemd/system/oomguard-app.slice"])
    assert d["MemoryMax"] == str(7 * GIB) and d["MemoryAccounting"] == "yes"
    user = ini(files["/etc/systemd/system/user-65534.slice.d/oomguard.conf"])
    assert user["MemoryMax"] == str(7 * GIB)


def test_services_get_the_policy_values_and_the_app_slice():
    files = units()
    values = {}
    for service in ("nginx.service", "php8.2-fpm.service", "mariadb.service"):
        d = ini(files[f"/etc/systemd/system/{service}.d/oomguard.conf"])
        assert d["Slice"] == "oomguard-app.slice"
        values[service] = int(d["OOMScoreAdjust"])
    assert values["nginx.service"] == -800 and values["php8.2-fpm.service"] == -900
    if setup.service_value("mariadb.service", setup_classes()) is not None:
        assert values["mariadb.service"] == -1000


def setup_classes():
    from oomguard.policy.rules import default_classes

    return default_classes(config())


def test_values_follow_a_configured_policy():
    classes = (
        parse_policy_class({"name": "nginx-master", "oom_score_adj": -300, "user": ["root"],
                            "exe": ["/usr/sbin/nginx"]}, "a"),
        parse_policy_class({"name": "redis", "oom_score_adj": -200, "user": ["root"],
                            "unit": ["redis*.service"]}, "b"),
    )
    cfg = config(services=["nginx.service", "redis-server.service", "varnish.service"])
    files = units(cfg, classes=classes)
    assert ini(files["/etc/systemd/system/nginx.service.d/oomguard.conf"])["OOMScoreAdjust"] == "-300"
    assert ini(files["/etc/systemd/system/redis-server.service.d/oomguard.conf"])["OOMScoreAdjust"] == "-200"
    varnish = ini(files["/etc/systemd/system/varnish.service.d/oomguard.conf"])
    assert "OOMScoreAdjust" not in varnish and varnish["Slice"] == "oomguard-app.slice"


def test_the_daemon_unit():
    files = units(exec_start="/opt/oomguard/bin/oomguard")
    d = ini(files["/etc/systemd/system/oomguard.service"])
    assert d["ExecStart"] == "/opt/oomguard/bin/oomguard daemon"
    assert d["OOMScoreAdjust"] == "-1000"
    assert d["Slice"] == "system.slice" != "oomguard-app.slice"
    assert d["MemoryMin"] == str(96 << 20)
    # memory.min protects only as far as the parent's does
    assert ini(files["/etc/systemd/system/system.slice.d/oomguard.conf"])["MemoryMin"] == str(96 << 20)


def test_no_user_slice_without_the_user_and_a_reserve_too_big():
    assert not any("user-" in p for p in units(uid=None))
    with pytest.raises(setup.SetupError, match="system_reserve"):
        units(ram=GIB)


def test_slice_cgroup_paths():
    assert setup.slice_cgroup("oomguard-app.slice") == "/oomguard.slice/oomguard-app.slice"
    assert setup.slice_cgroup("shop.slice") == "/shop.slice"
    assert setup.slice_cgroup("-.slice") == "/"


# ---------------------------------------------------------------- systemd-analyze verify


def verify(files: dict[str, str], tmp: Path) -> list[str]:
    """Problems systemd-analyze reports about our files (empty: valid).

    The units go into a private unit directory searched before the system's
    (SYSTEMD_UNIT_PATH with a trailing ':'); services that only get a drop-in
    get a stub, so the check does not depend on nginx being installed. A
    unit's problems are warnings with its path and exit status 0, so every
    line naming a file of ours counts, as does a non-zero exit."""
    setup.write_files(files, tmp)
    unit_dir = tmp / "etc/systemd/system"
    stubs = tmp / "stubs"
    stubs.mkdir()
    names = []
    for path in files:
        rel = Path(path).relative_to(setup.UNIT_DIR)
        name = rel.parts[0].removesuffix(".d") if rel.parts[0].endswith(".d") else rel.name
        names.append(name)
        if name.endswith(".service") and not (unit_dir / name).exists():
            (stubs / name).write_text("[Service]\nExecStart=/bin/true\n")
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:{stubs}:", "SYSTEMD_LOG_COLOR": "0"}
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", "--generators=no", *sorted(set(names))],
        capture_output=True, text=True, env=env, timeout=60,
    )
    lines = (proc.stdout + proc.stderr).splitlines()
    problems = [ln for ln in lines if str(tmp) in ln]
    if proc.returncode != 0:
        problems.append(f"exit status {proc.returncode}: {lines}")
    return problems


def needs_analyze(test):
    """systemd-analyze comes with Debian's systemd package, which
    scripts/install-test-deps installs: missing, the test fails, never skips."""
    return test


@needs_analyze
def test_generated_units_verify(tmp_path):
    exe = tmp_path / "oomguard"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    files = units(exec_start=str(exe))
    assert verify(files, tmp_path) == []


@needs_analyze
@pytest.mark.parametrize(
    "path, text",
    [
        ("/etc/systemd/system/oomguard-app.slice", "[Slice]\nMemoryMax=lots\n"),
        ("/etc/systemd/system/nginx.service.d/oomguard.conf", "[Service]\nOOMScoreAdjust=-5000\n"),
        ("/etc/systemd/system/oomguard.service", "[Service]\nExecStart=/nonexistent/oomguard daemon\n"),
        ("/etc/systemd/system/user-65534.slice.d/oomguard.conf", "[Slice]\nMemoryMaximum=1\n"),
    ],
)
def test_verify_rejects_a_broken_unit(tmp_path, path, text):
    exe = tmp_path / "oomguard"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    files = units(exec_start=str(exe))
    files[path] = text
    assert verify(files, tmp_path) != []


# ---------------------------------------------------------------- the command


def test_dry_run_prints_every_file_and_writes_nothing(tmp_path):
    out = io.StringIO()
    files = setup.apply_layout(config(), dry_run=True, systemd=True, ram=8 * GIB, app_uid=65534,
                               exec_start="/usr/bin/oomguard", out=out,
                               run=lambda argv: pytest.fail(f"ran {argv}"))
    text = out.getvalue()
    for path, body in files.items():
        assert f"==> {path} <==" in text and body in text
    assert "MemoryMax=" + str(7 * GIB) in text


def test_root_writes_under_the_directory_only(tmp_path):
    out = io.StringIO()
    files = setup.apply_layout(config(), root=tmp_path, ram=8 * GIB, app_uid=65534,
                               exec_start="/usr/bin/oomguard", out=out,
                               run=lambda argv: pytest.fail(f"ran {argv}"))
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted(p.lstrip("/") for p in files)
    for path, body in files.items():
        assert (tmp_path / path.lstrip("/")).read_text() == body
    assert not list(tmp_path.rglob(".*.tmp"))
    # rerunning gives the same files
    again = setup.apply_layout(config(), root=tmp_path, ram=8 * GIB, app_uid=65534,
                               exec_start="/usr/bin/oomguard", out=io.StringIO())
    assert again == files


def test_a_real_systemd_install_reloads_and_enables(tmp_path, monkeypatch):
    monkeypatch.setattr(setup, "write_files",
                        lambda files, root=None: [unitfiles.FileChange(Path(p), "wrote") for p in files])
    ran = []
    setup.apply_layout(config(), systemd=True, ram=8 * GIB, app_uid=65534, exec_start="/x",
                       run=ran.append, out=io.StringIO())
    assert ran == [["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", "oomguard.service"]]


# ---------------------------------------------------------------- without systemd


@pytest.fixture
def cgroupfs(tmp_path, monkeypatch):
    """A staged cgroup v2 mount: mkdir makes the interface files, as the
    kernel does."""
    root = tmp_path / "cg"
    root.mkdir()
    for name in ("cgroup.controllers", "cgroup.subtree_control", "cgroup.procs"):
        (root / name).write_text("memory pids\n" if name == "cgroup.controllers" else "")
    monkeypatch.setattr(cgroups, "ROOT", root)
    real_create = cgroups.create

    def create(cg, mode=0o755):
        real_create(cg, mode)
        for name in ("cgroup.subtree_control", "cgroup.procs", "memory.max"):
            f = cgroups.path(cg) / name
            if not f.exists():
                f.write_text("max\n" if name == "memory.max" else "")

    monkeypatch.setattr(cgroups, "create", create)
    return root


def test_cgroup_layout_dry_run_then_real(cgroupfs):
    cfg = config(app_cgroup="shop/app")
    out = io.StringIO()
    steps = setup.apply_layout(cfg, dry_run=True, systemd=False, ram=8 * GIB, out=out)
    assert [(s.kind, s.cgroup) for s in steps] == [
        ("enable", "/"), ("create", "/shop"), ("enable", "/shop"), ("create", "/shop/app"),
        ("limit", "/shop/app"),
    ]
    assert not (cgroupfs / "shop").exists()
    assert f"{cgroupfs}/shop/app/memory.max: {7 * GIB}" in out.getvalue()
    setup.apply_layout(cfg, systemd=False, ram=8 * GIB, out=io.StringIO())
    assert (cgroupfs / "shop/app/memory.max").read_text() == str(7 * GIB)
    assert (cgroupfs / "cgroup.subtree_control").read_text() == "+memory"
    assert (cgroupfs / "shop/cgroup.subtree_control").read_text() == "+memory"


def test_cgroup_layout_needs_cgroup_v2(tmp_path, monkeypatch):
    monkeypatch.setattr(cgroups, "ROOT", tmp_path)
    with pytest.raises(setup.SetupError, match="cgroup v2"):
        setup.apply_layout(config(), systemd=False, ram=8 * GIB, out=io.StringIO())


def test_defaults_render():
    files = setup.render_units(Config(layout=LayoutConfig()), 4 * GIB, None)
    assert ini(files["/etc/systemd/system/oomguard-app.slice"])["MemoryMax"] == str(4 * GIB - (512 << 20))


def test_rerunning_setup_writes_nothing_and_says_so(tmp_path):
    kw = dict(root=tmp_path, ram=8 * GIB, app_uid=65534, exec_start="/usr/bin/oomguard")
    setup.apply_layout(config(), out=io.StringIO(), **kw)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    out = io.StringIO()
    setup.apply_layout(config(), out=out, **kw)
    lines = out.getvalue().splitlines()
    assert lines[-1] == "nothing changed"
    assert sorted(lines[:-1]) == sorted(f"unchanged {p}" for p in mtimes)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_uninstall_removes_what_setup_wrote_and_restores_what_it_replaced(tmp_path):
    kw = dict(root=tmp_path, app_uid=65534)
    admins = tmp_path / "etc/systemd/system/nginx.service.d/oomguard.conf"
    admins.parent.mkdir(parents=True)
    admins.write_text("[Service]\nLimitNOFILE=65536\n")  # an admin's own file at our path
    other = tmp_path / "etc/systemd/system/nginx.service.d/local.conf"
    other.write_text("[Service]\nNice=5\n")
    before = {p: p.read_text() for p in tmp_path.rglob("*") if p.is_file()}
    setup.apply_layout(config(), out=io.StringIO(), ram=8 * GIB, exec_start="/usr/bin/oomguard", **kw)
    assert admins.read_text().startswith(unitfiles.HEADER)
    out = io.StringIO()
    setup.remove_layout(config(), out=out, run=lambda argv: pytest.fail(f"ran {argv}"), **kw)
    after = {p: p.read_text() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # ours gone, the admin's back, nothing else touched
    assert f"restored {admins}" in out.getvalue().splitlines()
    assert not (tmp_path / "etc/systemd/system/php8.2-fpm.service.d").exists()  # emptied drop-in dirs go
    again = io.StringIO()
    setup.remove_layout(config(), out=again, **kw)  # twice is harmless
    assert {line.split()[0] for line in again.getvalue().splitlines()} == {"absent"}
    assert {p: p.read_text() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_uninstall_on_a_real_systemd_stops_first_and_reloads_last(monkeypatch):
    monkeypatch.setattr(setup, "remove_files", lambda paths, root=None: [])
    monkeypatch.setattr(setup, "has_systemd", lambda: True)
    ran = []
    setup.remove_layout(config(), app_uid=65534, run=ran.append, out=io.StringIO())
    assert ran == [["systemctl", "disable", "--now", "oomguard.service"], ["systemctl", "daemon-reload"]]


def test_the_daemons_unit_is_sandboxed_better_than_its_peers(tmp_path):
    """systemd-analyze's exposure score of the rendered unit (earlyoom's
    Debian unit scores 8.4, nohang's 6.3, systemd-oomd's 2.0)."""
    import re
    import subprocess

    unit = tmp_path / "oomguard.service"
    files = setup.render_units(config(), 8 * GIB, None, exec_start="/usr/bin/oomguard", classes=())
    unit.write_text(files[f"{setup.UNIT_DIR}/oomguard.service"])
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                         capture_output=True, text=True).stdout
    score = float(re.search(r"Overall exposure level for oomguard.service: ([\d.]+)", out).group(1))
    assert score <= 5.0, out


def test_the_packages_unit_is_used_instead_of_writing_one_into_etc(tmp_path, monkeypatch):
    vendor = tmp_path / "lib/oomguard.service"
    vendor.parent.mkdir()
    vendor.write_text("[Service]\nExecStart=/usr/bin/oomguard daemon\n")
    monkeypatch.setattr(setup, "VENDOR_UNIT", str(vendor))
    out = io.StringIO()
    files = setup.apply_layout(config(), dry_run=True, systemd=True, ram=8 * GIB, app_uid=65534, out=out,
                               exec_start="/usr/bin/oomguard", run=lambda argv: pytest.fail(f"ran {argv}"))
    assert f"{setup.UNIT_DIR}/oomguard.service" not in files
    assert f"{setup.UNIT_DIR}/oomguard-app.slice" in files
    assert f"the package's {vendor}" in out.getvalue()
