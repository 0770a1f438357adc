"""cli.doctor's systemd checks, given what systemctl shows (the systemd guest
runs them against the real one)."""

from oomguard.cli import doctor
from oomguard.config import Config


def shower(units: dict[str, dict[str, str]]):
    return lambda unit, *props: {k: v for k, v in units.get(unit, {"LoadState": "not-found"}).items()
                                 if k in props}  # fmt: skip


def test_another_oom_killer_enabled_or_active_is_flagged():
    show = shower({
        "earlyoom.service": {"LoadState": "loaded", "ActiveState": "active", "UnitFileState": "enabled"},
        "systemd-oomd.service": {"LoadState": "loaded", "ActiveState": "inactive", "UnitFileState": "enabled"},
        "nohang.service": {"LoadState": "loaded", "ActiveState": "inactive", "UnitFileState": "disabled"},
    })  # fmt: skip
    found = [f for f in doctor.systemd_checks(Config(), show) if f.topic == "oom-killers"]
    assert [f.text.split()[0] for f in found] == ["systemd-oomd.service", "earlyoom.service"]
    assert all(f.level == "warn" and "systemctl disable --now" in f.text for f in found)


def test_a_service_outside_the_app_slice_is_flagged_until_it_restarts():
    app = "/oomguard.slice/oomguard-app.slice"
    show = shower({
        "nginx.service": {"LoadState": "loaded", "ActiveState": "active", "ControlGroup": "/system.slice/nginx.service"},
        "php8.2-fpm.service": {"LoadState": "loaded", "ActiveState": "active",
                               "ControlGroup": f"{app}/php8.2-fpm.service"},
        "mariadb.service": {"LoadState": "loaded", "ActiveState": "inactive", "ControlGroup": ""},
    })  # fmt: skip
    found = {f.text.split()[0]: f for f in doctor.systemd_checks(Config(), show) if f.topic == "layout"}
    assert found["nginx.service"].level == "warn" and "systemctl restart nginx.service" in found["nginx.service"].text
    assert found["php8.2-fpm.service"].level == "ok"
    assert "mariadb.service" not in found  # not running: nothing to say
