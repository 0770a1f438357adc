"""FILE.d/*.toml drop-ins merged over the main file, for config management."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from oomguard import config
from oomguard.config import ConfigError

OOMGUARD = str(Path(sys.executable).with_name("oomguard"))


@pytest.fixture
def main(tmp_path):
    p = tmp_path / "oomguard.toml"
    p.write_text('[healer]\ngrace = "5m"\nterm_timeout = "30s"\n[[healer.check]]\nname = "shop"\n'
                 'http = "http://127.0.0.1/"\n[metrics]\ntop_comms = 10\n')  # fmt: skip
    (tmp_path / "oomguard.toml.d").mkdir()
    return p


def dropin(main: Path, name: str, text: str) -> Path:
    p = main.with_name("oomguard.toml.d") / name
    p.write_text(text)
    return p


def test_dropins_apply_in_lexical_order_tables_merge_and_arrays_are_replaced(main):
    dropin(main, "20-plan.toml", '[healer]\ngrace = "15m"\n')
    dropin(main, "10-base.toml", '[healer]\ngrace = "10m"\n[[healer.check]]\nname = "api"\ntcp = "127.0.0.1:9000"\n')
    dropin(main, "30-ignored.toml.dpkg-old", '[healer]\ngrace = "99m"\n')
    dropin(main, ".hidden.toml", '[healer]\ngrace = "98m"\n')
    cfg = config.load(main)
    assert cfg.healer.grace == 15 * 60  # 20-plan after 10-base
    assert cfg.healer.term_timeout == 30  # untouched keys of a merged table stay
    assert [c.name for c in cfg.healer.checks] == ["api"]  # an array of tables is replaced whole
    assert cfg.metrics.top_comms == 10
    d = main.with_name("oomguard.toml.d")
    assert cfg.files == (str(main), str(d / "10-base.toml"), str(d / "20-plan.toml"))


def test_an_error_names_the_dropin_and_the_key(main):
    bad = dropin(main, "50-bad.toml", "[healer]\ngrace = \"soon\"\n")
    with pytest.raises(ConfigError) as e:
        config.load(main)
    assert str(e.value).startswith(f"{bad}: healer.grace: "), e.value
    dropin(main, "50-bad.toml", "[healer\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: invalid TOML"):
        config.load(main)


def test_an_unknown_key_in_a_dropin_names_that_dropin(main):
    bad = dropin(main, "60-typo.toml", "[metrics]\ntop_comm = 5\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: metrics.top_comm: unknown key"):
        config.load(main)


def test_config_show_gives_each_value_with_its_file(main):
    plan = dropin(main, "20-plan.toml", '[healer]\ngrace = "15m"\n')
    out = subprocess.run([OOMGUARD, "config", "show", str(main), "--json"], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    shown = {v["key"]: (v["value"], v["from"]) for v in json.loads(out)["values"]}
    assert shown["healer.grace"] == ("15m", str(plan))
    assert shown["healer.term_timeout"] == ("30s", str(main))
    assert shown["healer.check[0].name"] == ("shop", str(main))
    text = subprocess.run([OOMGUARD, "config", "show", str(main)], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    assert f'healer.grace = "15m"  # {plan}' in text.splitlines()
    check = subprocess.run([OOMGUARD, "config", "check", str(main)], capture_output=True, text=True,
                           check=True).stdout  # fmt: skip
    assert check.splitlines() == [f"{main}: OK", f"  merged over it: {plan}"]
