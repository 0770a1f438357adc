"""A probe's cancellation: the watchdog wakes a probe blocked on its socket."""

from __future__ import annotations

import threading
import time

from probe_servers import never_answer, server

from oomguard.healer import probe_base, probe_mysql


def test_cancel_wakes_a_blocked_socket_probe():
    with server(never_answer) as s:
        cancel = probe_base.Cancel()
        result = []
        t = threading.Thread(
            target=lambda: result.append(probe_mysql.probe_mysql(s.address, 30, cancel)),
            daemon=True,
        )
        t.start()
        time.sleep(0.2)
        cancel.cancel()
        t.join(5)
    assert result and not result[0].ok
