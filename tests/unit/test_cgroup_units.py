"""cgroups.unit_of: only the system manager's units count, never names a user chose."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from oomguard.host import cgroups


@pytest.mark.parametrize(
    ("path", "unit"),
    [
        ("/system.slice/mariadb.service", "mariadb.service"),
        ("/system.slice/php8.2-fpm.service", "php8.2-fpm.service"),
        ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope"),
        ("/oomguard.app/php-fpm", None),
        ("/", None),
        (None, None),
        # below a user's manager every name is the user's choice
        ("/user.slice/user-1000.slice/user@1000.service/app.slice/shop-queue.service", "user@1000.service"),
        ("/user.slice/user-1000.slice/user@1000.service/mariadb.service", "user@1000.service"),
    ],
)
def test_unit_of_a_path(path: str | None, unit: str | None) -> None:
    assert cgroups.unit_of(path, check_owner=False) == unit


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away")
def test_a_unit_name_inside_a_cgroup_a_user_owns_does_not_count(tmp_path: Path, monkeypatch) -> None:
    """A delegated subtree (owned by the user, as systemd's Delegate= gives
    it) can hold any name; what counts is the last unit above it."""
    monkeypatch.setattr(cgroups, "ROOT", tmp_path)
    delegated = tmp_path / "system.slice" / "shop-worker.service" / "inner"
    forged = delegated / "mariadb.service"
    forged.mkdir(parents=True)
    os.chown(delegated, 65534, 65534)
    os.chown(forged, 65534, 65534)
    rel = "/system.slice/shop-worker.service/inner/mariadb.service"
    assert cgroups.unit_of(rel) == "shop-worker.service"
    assert cgroups.unit_of(rel, check_owner=False) == "mariadb.service"
    os.chown(delegated, 0, 0)
    os.chown(forged, 0, 0)
    assert cgroups.unit_of(rel) == "mariadb.service"  # root's own tree: the name holds
