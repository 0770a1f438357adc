"""A real `oomguard daemon` for guest tests (started as root, stopped after),
and small helpers the guest tests share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
        time.sleep(interval)


@dataclass
class RunningDaemon:
    proc: subprocess.Popen
    config: Path
    socket: str
    state_dir: Path
    log: Path

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        return {**(base if base is not None else os.environ), "OOMGUARD_SOCKET": self.socket}

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "oomguard"), "--config", str(self.config), *args],
            capture_output=True, text=True, timeout=60, check=check, env=self.env(),
        )  # fmt: skip

    def cli_json(self, *args: str):
        return json.loads(self.cli(*args, "--json").stdout)

    def runs(self, all: bool = True) -> list[dict]:
        return self.cli_json("runs", *(["--all"] if all else []))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_daemon(base: Path, extra_toml: str = "", allow_users: tuple[str, ...] = ("shopuser",)) -> RunningDaemon:
    base.mkdir(parents=True, exist_ok=True)
    # /run, not base: pytest's tmp dirs are 0700 and users must reach the socket
    sock = f"/run/oomguard-test-{base.name}/protect.sock"
    cfg = base / "oomguard.toml"
    allow = ", ".join(f'"{u}"' for u in allow_users)
    cfg.write_text(
        f"""
[daemon]
state_dir = "{base / 'state'}"
log_level = "debug"
[protect]
socket = "{sock}"
allow_users = [{allow}]
[events]
db = "{base / 'state' / 'events.db'}"
[metrics]
listen = ""
{extra_toml}
"""
    )
    log = base / "daemon.log"
    proc = subprocess.Popen(
        [str(BIN / "oomguard"), "--config", str(cfg), "daemon"],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    d = RunningDaemon(proc, cfg, sock, base / "state", log)
    deadline = time.monotonic() + 60
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            d.stop()
            raise RuntimeError(f"the daemon did not start:\n{d.log_text()}")
        time.sleep(0.05)
    return d
