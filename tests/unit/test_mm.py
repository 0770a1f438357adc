"""host/mm.py against real CLONE_VM processes (a tiny C helper, built here)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from oomguard.host import mm, procfs

HELPER = Path(__file__).parent / "helpers" / "clonevm.c"


@pytest.fixture(scope="module")
def clonevm(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clonevm") / "clonevm"
    subprocess.run(["gcc", "-O2", "-o", str(out), str(HELPER)], check=True)
    return out


@pytest.fixture
def sharing_pair(clonevm: Path):
    """(parent, child): two processes, one mm (clone(CLONE_VM), not a thread)."""
    proc = subprocess.Popen([str(clonevm)], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    yield proc.pid, child
    for pid in (child, proc.pid):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    proc.wait()


def test_a_clone_vm_child_shares_its_parents_mm(sharing_pair) -> None:
    parent, child = sharing_pair
    assert mm.same_mm(parent, child)
    assert not mm.same_mm(parent, os.getpid())
    assert mm.mm_sharers(parent) == [child]
    assert mm.mm_sharers(child) == [parent]


def test_an_ordinary_process_shares_with_nobody() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        assert mm.mm_sharers(proc.pid) == []
    finally:
        proc.kill()
        proc.wait()


def test_a_gone_process_is_no_such_process() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(procfs.NoSuchProcess):
        mm.same_mm(proc.pid, os.getpid())
