"""systemd's service notification protocol (sd_notify(3)), without libsystemd.

``Type=notify``: READY=1 once the daemon serves, STOPPING=1 when it stops,
and WATCHDOG=1 keep-alives while ``WatchdogSec=`` is set. Outside systemd
($NOTIFY_SOCKET unset) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        # "@name" is an abstract socket; anything else must be an absolute path.
        if path.startswith("@"):
            self.address: str | None = "\0" + path[1:]
        elif path.startswith("/"):
            self.address = path
        else:
            self.address = None
        self.watchdog_seconds = _watchdog_seconds(env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """One datagram of KEY=value lines; False if it could not be sent."""
        if self.address is None:
            return False
        text = "\n".join(f"{k.upper()}={v}" for k, v in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(text.encode(), self.address)
            return True
        except OSError:
            return False

    def ready(self, status: str) -> bool:
        return self.send(ready=1, status=status, mainpid=os.getpid())

    def stopping(self) -> bool:
        return self.send(stopping=1)

    def watchdog(self) -> bool:
        return self.send(watchdog=1)


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """WatchdogSec= as systemd passed it, if it is meant for this process."""
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6
