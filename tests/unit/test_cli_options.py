"""The CLI's global options, before or after the command."""

from __future__ import annotations

import argparse

import pytest

from oomguard import __version__
from oomguard.cli import commands as cli

# Every leaf command with the arguments it needs.
COMMANDS = [
    ["daemon"], ["runs"], ["kill-run", "3"], ["status"], ["top"], ["events"], ["policy", "show"],
    ["policy", "apply"], ["setup"], ["doctor"], ["config", "check"],
]  # fmt: skip


def parse(argv: list[str]) -> argparse.Namespace:
    return cli.parser().parse_args(argv)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_config_before_or_after_every_command(command):
    assert parse(["--config", "/a.toml", *command]).config == "/a.toml"
    assert parse([*command, "--config", "/b.toml"]).config == "/b.toml"
    assert parse(command).config is None
    # After the command wins, as the later of two options does.
    assert parse(["--config", "/a.toml", *command, "--config", "/b.toml"]).config == "/b.toml"


def test_config_between_a_command_and_its_action():
    args = parse(["policy", "--config", "/c.toml", "show", "--all"])
    assert args.config == "/c.toml" and args.all and args.func is cli.cmd_policy_show
    assert parse(["config", "--config", "/c.toml", "check"]).config == "/c.toml"


@pytest.mark.parametrize("argv", [["--version"], ["status", "--version"], ["policy", "show", "--version"]])
def test_version_before_or_after_the_command(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"oomguard {__version__}"


@pytest.mark.parametrize("where", ["before", "after"])
def test_daemon_takes_its_config_after_the_command(tmp_path, capsys, where):
    bad = tmp_path / "oomguard.toml"
    bad.write_text("[metrics]\nlisten = '0.0.0.0:9464'\n")
    argv = ["--config", str(bad), "daemon"] if where == "before" else ["daemon", "--config", str(bad)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{bad}: metrics.listen: 0.0.0.0 is not a loopback address" in err


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_check_refuses_what_the_daemon_refuses(tmp_path, capsys, where):
    bad = tmp_path / "oomguard.toml"
    bad.write_text("[metrics]\nlisten = '0.0.0.0:9464'\n")
    argv = ["--config", str(bad), "config", "check"] if where == "before" else ["config", "check", "--config", str(bad)]
    assert cli.main(argv) == 2
    assert f"oomguard: {bad}: metrics.listen: 0.0.0.0 is not a loopback address" in capsys.readouterr().err


def test_config_check_accepts_a_good_file_given_after(tmp_path, capsys):
    good = tmp_path / "oomguard.toml"
    good.write_text("[metrics]\nlisten = '127.0.0.1:9464'\n")
    assert cli.main(["config", "check", "--config", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: OK\n"


def test_the_clients_default_socket_is_the_configs():
    from oomguard.cli.client import DEFAULT_SOCKET
    from oomguard.config import ProtectConfig

    assert DEFAULT_SOCKET == ProtectConfig().socket


def test_motd_at_login_does_not_import_the_rest_of_the_cli(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from oomguard import cli; rc = cli.main(['motd']); "
            "print(rc, sorted(m for m in sys.modules if m.startswith(('oomguard.config', 'argparse', 'oomguard.cli.commands'))))")  # fmt: skip
    env = {"OOMGUARD_SOCKET": str(tmp_path / "none.sock"), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "0 []"  # no daemon: silent, and nothing else imported
