"""The grant refuses a peer that shares its mm (issue 13): the kernel keeps
oom_score_adj per mm, so -1000 for it would be -1000 for a CLONE_VM sibling
that belongs to no run. Real CLONE_VM processes, through the real broker."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from broker_rig import Rig

from oomguard import broker, config
from oomguard.broker import Granter, Peer, Refusal
from oomguard.host import procfs
from oomguard.runs.registry import RunRegistry
from oomguard.telemetry.reasons import RefusalReason

HELPER = Path(__file__).parent / "helpers" / "clonevm_ask.c"


@pytest.fixture(scope="module")
def clonevm_ask(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clonevm") / "clonevm_ask"
    subprocess.run(["gcc", "-O2", "-o", str(out), str(HELPER)], check=True)
    return out


def test_a_peer_sharing_its_mm_is_refused_through_the_broker(rig: Rig, clonevm_ask: Path) -> None:
    b = rig.start(allow_uids=frozenset({os.getuid()}))
    out = subprocess.run([str(clonevm_ask), b.config.socket], capture_output=True, text=True, timeout=30)
    reply = json.loads(out.stdout)
    assert reply["ok"] is False and "shares its memory (mm) with pid" in reply["error"]
    assert rig.refusals[-1][1] == RefusalReason.SHARED_MM == "shared_mm"
    assert not b.granter.registry.all()  # no run, no write attempted


def test_a_sibling_made_during_the_grant_undoes_the_write(tmp_path, monkeypatch) -> None:
    """The check runs again after the write: a CLONE_VM child made meanwhile
    shares the new value, so the old one goes back and the grant is refused."""
    writes = []
    monkeypatch.setattr(procfs, "write_oom_score_adj", lambda value, pid="self", dir_fd=None: writes.append(value))
    answers = iter([[], [4242]])  # alone at the check, a sibling after the write
    child = subprocess.Popen(["sleep", "60"])
    try:
        before = procfs.read_oom_score_adj(child.pid)
        peer = Peer(pid=child.pid, uid=os.getuid(), gid=os.getgid(), groups=(), accepted=procfs.since_boot())
        broker.pin(peer)
        cfg = config.ProtectConfig(allow_uids=frozenset({os.getuid()}), run_cgroups=False)
        reg = RunRegistry(tmp_path / "runs.json", "boot")
        g = Granter(cfg, reg, sharers=lambda pid: next(answers))
        with pytest.raises(Refusal) as e:
            g.grant(peer)
        assert e.value.reason == RefusalReason.SHARED_MM and "pid 4242" in str(e.value)
        assert writes == [-1000, before] and reg.all() == []
        peer.close()
    finally:
        child.kill()
        child.wait()


def test_metrics_know_every_refusal_reason() -> None:
    from oomguard.forensics.metrics import REFUSAL_REASONS

    assert set(RefusalReason) <= set(REFUSAL_REASONS)


@pytest.mark.parametrize("cmdline, shown", [
    ("/opt/oomguard/bin/python /opt/oomguard/bin/oom-protect sleep 600", "sleep 600"),
    ("/usr/bin/python3 -I /usr/bin/hypernode-oom-protect --report --memory-max 2G -- php x.php", "php x.php"),
    ("python3.11 /x/oom-protect --memory-max=2G make -j4", "make -j4"),
    ("php bin/magento import", "php bin/magento import"),  # asked by its own program: as it is
    ("/usr/bin/python3 /usr/bin/oom-protect", "/usr/bin/python3 /usr/bin/oom-protect"),  # no CMD left: as it is
    ("/usr/bin/python3 evil.py /x/oom-protect sleep 1", "/usr/bin/python3 evil.py /x/oom-protect sleep 1"),
])  # fmt: skip
def test_a_runs_command_is_cmd_as_its_owner_typed_it(cmdline, shown) -> None:
    from oomguard.broker.grant import without_wrapper

    assert without_wrapper(cmdline) == shown
