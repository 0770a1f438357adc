"""The systemd flavour of the guest harness, on the host: what it hands init.sh, how
outcomes fold.  (That it boots is tests/systemd/test_boot_systemd.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

GUEST_DIR = Path(__file__).resolve().parents[1] / "guest"
if str(GUEST_DIR) not in sys.path:
    sys.path.insert(0, str(GUEST_DIR))

from harness import bridge, run_guest, systemd, vm  # noqa: E402


def test_boot_files_give_init_sh_our_target_units_and_masks(tmp_path):
    systemd.write_boot_files(tmp_path)
    root = tmp_path / "systemd"
    assert (root / "init").read_text().split() == [
        "/lib/systemd/systemd",
        "--unit=oomguard-test.target",
    ]
    target = (root / "system" / "oomguard-test.target").read_text()
    assert "Requires=basic.target\n" in target
    wants = [line for line in target.splitlines() if line.startswith("Wants=")]
    assert wants == ["Wants=oomguard-test.service oomguard-test-tmpfiles.service"]
    masked = (root / "masked").read_text().split()
    assert "system/systemd-tmpfiles-setup.service" in masked
    generators = {p.name for d in systemd.GENERATOR_DIRS if d.is_dir() for p in d.iterdir()}
    assert {m.removeprefix("system-generators/") for m in masked if "generators" in m} == generators
    tmpfiles = (root / "system" / "oomguard-test-tmpfiles.service").read_text()
    assert "mariadb.conf" in tmpfiles and "tmp.conf " not in tmpfiles  # tmp.conf would empty /tmp


def test_the_test_unit_reports_on_the_console_as_the_plain_guest_does(tmp_path):
    systemd.write_boot_files(tmp_path)
    run_sh = (tmp_path / "systemd" / "run.sh").read_text()
    assert vm.READY in run_sh and vm.DONE in run_sh
    assert "echo $rc >/results/rc" in run_sh
    assert run_sh.index("/results/.guest/cmd.sh") < run_sh.index(vm.DONE)
    unit = (tmp_path / "systemd" / "system" / "oomguard-test.service").read_text()
    assert "ExecStart=/bin/sh /results/.guest/systemd/run.sh" in unit
    assert "TTYPath=/dev/console" in unit


def test_an_unknown_flavour_is_refused_before_anything_boots(tmp_path):
    with pytest.raises(ValueError, match="flavour"):
        run_guest(["true"], flavour="upstart", results_dir=tmp_path)
    assert not (tmp_path / ".guest").exists()


def _write(report: Path, *records: tuple[str, str, str]) -> None:
    report.write_text(
        "".join(
            json.dumps({"nodeid": n, "when": w, "outcome": o, "longrepr": f"{w} {o}"}) + "\n"
            for n, w, o in records
        )
    )


def test_outcomes_fold_passed_only_with_call_and_teardown(tmp_path):
    report = tmp_path / "outcomes.jsonl"
    _write(
        report,
        ("t::ok", "setup", "passed"), ("t::ok", "call", "passed"), ("t::ok", "teardown", "passed"),
        ("t::cut", "setup", "passed"), ("t::cut", "call", "passed"),
        ("t::skip", "setup", "skipped"), ("t::skip", "teardown", "passed"),
        ("t::bad", "setup", "passed"), ("t::bad", "call", "passed"), ("t::bad", "teardown", "failed"),
    )  # fmt: skip
    out = bridge.read_outcomes(report)
    assert {k: v.status for k, v in out.items()} == {
        "t::ok": "passed",
        "t::cut": "missing",
        "t::skip": "skipped",
        "t::bad": "failed",
    }
    assert out["t::bad"].text == "error in teardown: teardown failed"


def test_a_suite_owns_only_its_directory(tmp_path):
    suite = bridge.GuestSuite(tmp_path / "systemd", flavour="systemd", env_prefix="X")

    class Item:
        def __init__(self, path: Path):
            self.path = path

    assert suite.owns(Item(tmp_path / "systemd" / "test_a.py"))
    assert not suite.owns(Item(tmp_path / "guest" / "test_a.py"))
