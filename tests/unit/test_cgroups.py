"""host.cgroups: the read paths on this host's cgroup v2 mount, and the
interface files the kernel offers on a staged tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from oomguard.host import cgroups, procfs


def _cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _dev, where, fstype, *_ = line.split()
        if fstype == "cgroup2":
            return Path(where)
    return None


@pytest.fixture
def host_cgroupfs(monkeypatch):
    root = _cgroup2_mount()
    assert root is not None, "this host has no cgroup v2 mount"
    monkeypatch.setattr(cgroups, "ROOT", root)
    return root


@pytest.fixture
def staged(tmp_path, monkeypatch):
    root = tmp_path / "cg"
    for d, files in {"": {"cgroup.procs": "", "cgroup.controllers": "memory\n"},
                     "a": {"memory.max": "1073741824\n", "memory.swap.max": "max\n"},
                     "b": {"memory.max": "max\n", "memory.swap.max": "268435456\n", "cgroup.kill": ""},
                     "b/c": {"memory.max": "536870912\n"}}.items():  # fmt: skip
        (root / d).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (root / d / name).write_text(text)
    monkeypatch.setattr(cgroups, "ROOT", root)
    return root


def test_this_process_is_found_in_its_cgroup(host_cgroupfs):
    assert cgroups.is_v2()
    mine = procfs.read_cgroup()
    assert mine is not None and cgroups.exists(mine)
    assert os.getpid() in cgroups.procs(mine)
    assert os.getpid() in cgroups.procs_recursive("/")
    assert cgroups.populated("/") or mine == "/"


def test_the_hosts_interface_files(host_cgroupfs):
    ctl = (host_cgroupfs / "cgroup.controllers").read_text().split()
    assert cgroups.controllers("/") == set(ctl)
    assert cgroups.kernel_offers("cgroup.procs")
    assert not cgroups.kernel_offers("no.such.interface")
    for child in cgroups.children("/"):
        assert cgroups.exists(child) and child.startswith("/")
    assert cgroups.memory_max("/") is None  # the root has no limit of its own


def test_swap_max_in_bytes_or_none(staged):
    assert cgroups.swap_max("/a") is None  # "max"
    assert cgroups.swap_max("/b") == 256 << 20
    assert cgroups.swap_max("/b/c") is None  # no such file
    assert cgroups.swap_max("/nope") is None


def test_children_and_what_the_kernel_offers_below_the_root(staged):
    assert cgroups.children("/") == ["/a", "/b"]
    assert cgroups.children("/b") == ["/b/c"]
    assert cgroups.children("/nope") == []
    assert cgroups.kernel_offers("memory.swap.max")  # only in children
    assert cgroups.kernel_offers("cgroup.kill")
    (staged / "b" / "cgroup.kill").unlink()
    assert not cgroups.kernel_offers("cgroup.kill")


def test_limits_and_paths(staged):
    assert cgroups.memory_max("/a") == 1 << 30 and cgroups.memory_max("/b") is None
    assert cgroups.effective_memory_limit("/b/c") == 512 << 20
    assert cgroups.normalize("a/b/") == "/a/b" and cgroups.join("/a/", "b") == "/a/b"
    with pytest.raises(cgroups.CgroupError):
        cgroups.path("/a/../../etc")
    assert cgroups.unit_of("/system.slice/nginx.service/x") == "nginx.service"
    assert cgroups.unit_of("/") is None and cgroups.unit_of(None) is None


def test_a_cgroup_being_removed_reads_as_gone(monkeypatch, tmp_path):
    """systemd stopping a scope (or a run's end) removes its cgroup while we
    read it: the kernel answers ENODEV, which means gone, as ENOENT does."""
    import errno as _errno
    from pathlib import Path as _Path

    from oomguard.host import cgroups as cg

    def dying(self, *a, **k):
        raise OSError(_errno.ENODEV, "No such device", str(self))

    monkeypatch.setattr(cg, "ROOT", tmp_path)
    (tmp_path / "scope").mkdir()
    monkeypatch.setattr(_Path, "read_text", dying)
    assert cg.procs("/scope") == [] and cg.procs_recursive("/scope") == []
    assert cg.read_flat_keyed("/scope", "cgroup.events") == {}


def test_other_errors_of_a_cgroup_read_still_raise(monkeypatch, tmp_path):
    import errno as _errno
    from pathlib import Path as _Path

    from oomguard.host import cgroups as cg

    def denied(self, *a, **k):
        raise OSError(_errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(cg, "ROOT", tmp_path)
    monkeypatch.setattr(_Path, "read_text", denied)
    with pytest.raises(PermissionError):
        cg.procs("/scope")
