"""A real broker on a real socket, for the broker's tests and its bench.

The socket lives under a 0755 directory in /tmp (not pytest's 0700 tmp_path),
so that a client run as ``nobody`` reaches it."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from oomguard import config
from oomguard.broker import Broker, Granter
from oomguard.daemon import Daemon
from oomguard.runs.registry import RunRegistry

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
CLIENT = (
    "import socket, sys; s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1]);"
    "s.sendall(sys.argv[2].encode() + b'\\n'); sys.stdout.write(s.makefile().readline())"
)


def public_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="oomguard-broker-", dir="/tmp"))
    d.chmod(0o755)
    return d


class Rig:
    """Brokers started here are stopped by ``close``."""

    def __init__(self) -> None:
        self.base = public_dir()
        self._running: list[tuple[threading.Event, threading.Thread]] = []
        self.refusals: list[tuple[int, str, str]] = []

    def protect_config(self, **protect) -> config.Config:
        base = config.ProtectConfig(socket=str(self.base / "s" / "protect.sock"), request_timeout=0.5)
        return config.Config(protect=replace(base, **protect))

    def granter(self, cfg: config.Config) -> Granter:
        return Granter(cfg.protect, RunRegistry(self.base / "runs.json", "boot"),
                       on_refusal=lambda peer, reason, msg: self.refusals.append((peer.uid, reason, msg)))

    def serve(self, broker: Broker) -> Broker:
        stop = threading.Event()
        t = threading.Thread(target=broker.serve, args=(stop,), daemon=True)
        t.start()
        assert broker.ready.wait(5)
        self._running.append((stop, t))
        return broker

    def start(self, handlers=None, broker_args=None, **protect) -> Broker:
        cfg = self.protect_config(**protect)
        return self.serve(Broker(cfg, self.granter(cfg), handlers, **(broker_args or {})))

    def close(self) -> None:
        for stop, t in self._running:
            stop.set()
            t.join(5)
        shutil.rmtree(self.base, ignore_errors=True)


def in_process_daemon(rig: Rig) -> Daemon:
    """A Daemon whose broker serves its real ops on the rig's socket; no
    other thread of it runs, and its policy is not enforced."""
    cfg = rig.protect_config()
    cfg = replace(cfg, state_dir=str(rig.base / "state"),
                  events=replace(cfg.events, db=str(rig.base / "state" / "events.db")),
                  policy=replace(cfg.policy, enforce=False))  # fmt: skip
    d = Daemon(cfg)
    rig.serve(d.broker)
    return d


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def ask(path: str, request: dict | bytes) -> dict:
    data = request if isinstance(request, bytes) else (json.dumps(request) + "\n").encode()
    with connect(path) as s:
        s.sendall(data)
        return json.loads(s.makefile("rb").readline())


def ask_as_nobody(path: str, request: dict) -> dict:
    out = subprocess.run([*AS_NOBODY, sys.executable, "-c", CLIENT, path, json.dumps(request)],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return json.loads(out)
