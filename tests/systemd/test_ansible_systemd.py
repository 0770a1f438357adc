"""contrib/ansible's role, run by Debian's ansible-core (`-c local`) in the
systemd guest: the first run changes the host, the second changes nothing,
the daemon is reloaded only when a file changed, and `oomguard doctor
--json` has no error afterwards.

The role's package task is switched off (oomguard_install_package: false)
and the role drives the test venv's oomguard: test_package_systemd.py
installs the package itself; tests/unit/test_fleet_contrib.py checks the
package tasks' syntax and the template's TOML.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from systemd_tools import OOMGUARD, UNIT_DIR, oomguard, run, systemctl, unit_property, wait_until

ROLE = Path(__file__).resolve().parents[2] / "contrib" / "ansible" / "roles" / "oomguard"
ETC = Path("/etc/oomguard")
APP_SLICE = UNIT_DIR / "oomguard-app.slice"
BASE = {
    "metrics": {"listen": "", "textfile": "/var/lib/prometheus/node-exporter/oomguard.prom"},
    "healer": {"grace": "3m", "window": [{"from": "23:00", "to": "07:00", "grace": "15m"}]},
    "protect": {"max_runs_per_uid": 8},
}
PLAN = {"layout": {"system_reserve": "600M"}, "metrics": {"top_comms": 5}}


def recap(output: str) -> dict[str, int]:
    """The PLAY RECAP counts for localhost."""
    m = re.search(r"^localhost\s+:\s+(.*)$", output, re.M)
    assert m, output[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m[1])}


def reloads() -> int:
    """How often the daemon has said it reloaded its config (SIGHUP) this boot."""
    out = run(["journalctl", "-b", "-u", "oomguard.service", "-o", "cat", "--no-pager"]).stdout
    return out.count("config reloaded from")


@pytest.fixture(scope="module")
def play(tmp_path_factory) -> Iterator[callable]:
    """play(dropins) runs the role once and returns (recap, output)."""
    work = tmp_path_factory.mktemp("ansible")
    before = set(UNIT_DIR.rglob("*"))
    saved = tmp_path_factory.mktemp("etc-saved") / "oomguard"
    if ETC.exists():
        shutil.copytree(ETC, saved)

    def play(dropins: dict) -> tuple[dict[str, int], str]:
        book = work / "site.yml"
        book.write_text(yaml.safe_dump([{
            "hosts": "localhost",
            "gather_facts": False,
            "roles": [{"role": "oomguard", "vars": {
                "oomguard_install_package": False,
                "oomguard_bin": OOMGUARD,
                "oomguard_config": BASE,
                "oomguard_dropins": dropins,
            }}],
        }]))  # fmt: skip
        proc = run(
            ["ansible-playbook", "-c", "local", "-i", "localhost,", "-e",
             "ansible_python_interpreter=/usr/bin/python3", str(book)],
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
                 "ANSIBLE_NOCOLOR": "1", "ANSIBLE_PIPELINING": "1", "ANSIBLE_LOCAL_TEMP": str(work / "tmp"),
                 "ANSIBLE_HOME": str(work / "home"), "ANSIBLE_ROLES_PATH": str(ROLE.parent)},
            timeout=900,
        )  # fmt: skip
        return recap(proc.stdout), proc.stdout

    try:
        yield play
    finally:
        oomguard("setup", "--uninstall", check=False)
        systemctl("stop", "oomguard.service", check=False)
        for p in sorted(set(UNIT_DIR.rglob("*")) - before, reverse=True):
            p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
        systemctl("daemon-reload")
        systemctl("reset-failed", check=False)
        shutil.rmtree(ETC, ignore_errors=True)
        Path(BASE["metrics"]["textfile"]).unlink(missing_ok=True)
        if saved.exists():
            shutil.copytree(saved, ETC)


def test_the_role_changes_the_host_then_nothing(play):
    first, out = play({"50-plan": PLAN})
    assert first["failed"] == 0 and first["changed"] >= 4, out[-3000:]
    # the files, as the variables said
    main = tomllib.loads((ETC / "oomguard.toml").read_text())
    assert main == BASE
    assert tomllib.loads((ETC / "oomguard.toml.d" / "50-plan.toml").read_text()) == PLAN
    shown = json.loads(oomguard("config", "show", "--json").stdout)  # merged, with where each came from
    origin = {v["key"]: v["from"] for v in shown["values"]}
    assert origin["metrics.top_comms"] == str(ETC / "oomguard.toml.d" / "50-plan.toml")
    assert origin["metrics.textfile"] == str(ETC / "oomguard.toml")
    # setup ran: the slice and the daemon, which the handler then reloaded
    assert APP_SLICE.exists() and unit_property("oomguard.service", "ActiveState") == "active"
    assert "TASK [oomguard : Run oomguard setup]" in out and "RUNNING HANDLER [oomguard : Reload oomguard]" in out
    wait_until(lambda: reloads() == 1, "the daemon's reload after the first run")  # logged off the signal
    reserve = (600 << 20) + int(unit_property("oomguard-app.slice", "MemoryMax"))
    assert reserve == int(Path("/proc/meminfo").read_text().split()[1]) * 1024  # the drop-in's system_reserve

    second, out = play({"50-plan": PLAN})
    print(f"\nFIGURE ansible idempotence: first run changed={first['changed']}, second run {second}")
    assert second["changed"] == 0 and second["failed"] == 0, out[-3000:]
    assert "RUNNING HANDLER" not in out and reloads() == 1
    if figures := os.environ.get("OOMGUARD_GUEST_RESULTS"):
        with open(Path(figures) / "figures.txt", "a") as f:
            f.write(f"ansible_first_run_changed {first['changed']}\nansible_second_run_changed {second['changed']}\n")


def test_doctor_reports_no_error_after_the_role(play):
    assert unit_property("oomguard.service", "ActiveState") == "active"
    proc = oomguard("doctor", "--json", check=False)
    findings = json.loads(proc.stdout)
    errors = [f for f in findings if f["level"] == "error"]
    assert not errors and proc.returncode == 0, findings
    assert {f["level"] for f in findings} <= {"ok", "warn"}
