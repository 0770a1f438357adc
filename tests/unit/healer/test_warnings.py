"""healer.warnings: run owners told before the healer acts, on a real pty."""

from __future__ import annotations

import os
import select
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from oomguard.config import HealerConfig
from oomguard.healer.incident import Incident, Phase
from oomguard.healer.warnings import DOWN, FINAL, VOID, RunWarnings
from oomguard.runs.run import Run

WALL0 = datetime(2026, 12, 2, 14, 0, 0, tzinfo=UTC).timestamp()


@pytest.fixture
def pty():
    """A real terminal: the run's tty (owned by us, as a run's is by its owner)."""
    master, slave = os.openpty()
    yield os.ttyname(slave), master
    os.close(master)
    os.close(slave)


def read_all(master: int) -> str:
    out = b""
    while select.select([master], [], [], 0.2)[0]:
        out += os.read(master, 65536)
    return out.decode()


class Rig:
    def __init__(self, tty: str, grace: float = 600.0, warn_before: float = 60.0):
        self.cfg = replace(HealerConfig(), grace=grace, warn_before=warn_before, timezone="UTC")
        self.runs = [Run(12, os.getuid(), "app", 4242, 1, WALL0, "php bin/magento import:products big.csv", None,
                         tty=tty)]  # fmt: skip
        self.events: list[tuple[str, dict, list[int]]] = []
        self.boot = 1000.0
        self.warnings = RunWarnings(self.cfg, lambda: self.runs, self.record, self.wall)
        self.incident = Incident("boot", self.boot, WALL0, "day", grace, ["shop"])

    def wall(self) -> float:
        return WALL0 + (self.boot - 1000.0)

    def record(self, kind: str, data: dict, uids) -> None:
        self.events.append((kind, data, list(uids)))

    def tick(self, seconds: float = 0.0) -> None:
        self.boot += seconds
        self.warnings.update(self.boot, self.incident)

    def actions(self) -> list[str]:
        return [d["action"] for _, d, _ in self.events]


def test_owners_are_told_at_the_outage_then_before_the_grace_ends(pty):
    path, master = pty
    rig = Rig(path)
    rig.tick()
    text = read_all(master)
    assert "the shop is down (checks shop failing)" in text
    assert "run 12 (php bin/magento import:products big.csv) will be stopped at 14:10:00 UTC" in text
    assert "oomguard kill-run 12" in text
    kind, data, uids = rig.events[0]
    assert (kind, data["action"], data["run"], uids, data["told_tty"]) == ("warning", DOWN, 12, [os.getuid()], True)
    assert data["acts_at"] == WALL0 + 600
    rig.tick(300)
    rig.tick(239)  # 61 s left: not yet
    assert rig.actions() == [DOWN]
    rig.tick(1)  # 60 s left
    assert rig.actions() == [DOWN, FINAL]
    assert "will be stopped in 1m00s, at 14:10:00 UTC" in read_all(master)
    rig.tick(30)
    assert rig.actions() == [DOWN, FINAL]  # each said once


def test_recovery_in_time_voids_the_warning(pty):
    path, master = pty
    rig = Rig(path)
    rig.tick()
    read_all(master)
    rig.incident.recovered = rig.boot + 100
    rig.warnings.recovered(rig.incident)
    assert rig.actions() == [DOWN, VOID]
    assert "the shop is up again; your protected run 12 will not be stopped" in read_all(master)


def test_no_void_once_the_healer_acted_and_a_run_granted_mid_outage_is_warned(pty):
    path, master = pty
    rig = Rig(path)
    rig.tick()
    rig.runs.append(replace(rig.runs[0], id=13, tty=None))
    rig.tick(5)
    assert [(d["action"], d["run"], d["told_tty"]) for _, d, _ in rig.events] == [(DOWN, 12, True), (DOWN, 13, False)]
    rig.incident.phase = Phase.TERMINATING
    rig.tick(600)
    rig.incident.recovered = rig.boot
    rig.warnings.recovered(rig.incident)
    assert VOID not in rig.actions() and FINAL not in rig.actions()


def test_a_grace_shorter_than_the_lead_gives_one_warning(pty):
    path, _ = pty
    rig = Rig(path, grace=30.0, warn_before=60.0)
    for _ in range(10):
        rig.tick(2)
    assert rig.actions() == [DOWN]


def test_every_warning_of_an_incident_names_the_same_time_even_after_a_late_tick(pty):
    """A tick whose clock reading aged (it waited) must not move the time
    the owner was told: the lead-time warning repeats the first one's."""
    path, master = pty
    rig = Rig(path)
    rig.tick()
    assert "will be stopped at 14:10:00 UTC" in read_all(master)
    rig.boot += 546  # 54 s left; the late tick's clock says 59
    rig.warnings.update(rig.boot - 5, rig.incident)  # a tick that read its clock 5 s before the wall clock
    text = read_all(master)
    assert rig.actions() == [DOWN, FINAL] and "at 14:10:00 UTC" in text, text
    assert [d["acts_at"] for _, d, _ in rig.events] == [WALL0 + 600] * 2
