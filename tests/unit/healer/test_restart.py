"""Restart tries in the background, with real commands."""

from __future__ import annotations

import time

from healer_rig import Rig, down_at

from oomguard.config import (
    Service,
)
from oomguard.healer import commands


def test_restart_in_the_background_with_real_commands(tmp_path):
    marker = tmp_path / "restarted"
    rig = Rig(tmp_path, services=(Service("svc", ("sh", "-c", f"echo $$ > {marker}")),))
    h = rig.healer(background=True, run_command=commands.run_command)
    down_at(rig, h)
    rig.step(h, 180)
    deadline = time.monotonic() + 20
    while not rig.actions("restart"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
        h.tick()
    assert marker.exists()
    restart = rig.actions("restart")[0]
    assert restart["services"][0]["ok"] is True
