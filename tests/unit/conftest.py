import os
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.fixture
def bin_path():
    """Where pip put the console scripts (not a pyenv shim: tests exec them directly)."""
    return BIN


@pytest.fixture
def clean_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OOMGUARD_")}
    env["OOMGUARD_SOCKET"] = str(tmp_path / "no-daemon.sock")
    return env
