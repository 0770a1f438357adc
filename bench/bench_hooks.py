"""How long an event takes to reach a webhook: from the moment it is stored to
the moment a real HTTP receiver on loopback has the POST.

The product's path, as the daemon wires it: EventStore.add commits the event
(SQLite, on disk), its on_added hands it to the Notifier, the webhook's own
worker thread POSTs it. Side by side with the floor, a bare urllib POST of the
same body to the same receiver from the same process. Each event is sent
alone, after the last one arrived, so the figure is a latency, not a
throughput. Medians and p99 over N events, and their ratio to the floor.

    python3 bench/bench_hooks.py [--events 300]
"""

from __future__ import annotations

import argparse
import http.server
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from oomguard.config.notify import NotifyConfig, WebhookHook
from oomguard.forensics.events import EventStore
from oomguard.notify.dispatch import Notifier


class Receiver:
    """Notes the arrival time of each POST (monotonic, this process's clock)."""

    def __init__(self) -> None:
        self.arrived: list[float] = []
        self.got = threading.Condition()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                with outer.got:
                    outer.arrived.append(time.monotonic())
                    outer.got.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, n: int) -> float:
        with self.got:
            if not self.got.wait_for(lambda: len(self.arrived) >= n, 30):
                sys.exit(f"event {n} never reached the receiver")
            return self.arrived[n - 1]


def p99(xs: list[float]) -> float:
    return sorted(xs)[max(0, int(len(xs) * 0.99) - 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=300)
    args = ap.parse_args()
    rx = Receiver()
    event = {"victim_pid": 4242, "victim_comm": "php-fpm8.2", "victim_uid": 1001, "oom_memcg": "/app",
             "protected_runs": [{"id": 12, "user": "app", "uid": 1001, "command": "php import.php"}]}  # fmt: skip

    # the floor: the same receiver, a bare POST
    floor = []
    for _ in range(args.events):
        t0 = time.monotonic()
        req = urllib.request.Request(rx.url, data=b'{"kind": "oom_kill"}', method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()
        floor.append(rx.wait(len(rx.arrived)) - t0)
    base = len(rx.arrived)

    hook = WebhookHook(url=rx.url, kinds=frozenset({"oom_kill"}))
    notifier = Notifier(NotifyConfig(webhook=(hook,)))
    notifier.start()
    product = []
    with tempfile.TemporaryDirectory(prefix="oomguard-bench-hooks-") as d:
        store = EventStore(str(Path(d) / "events.db"), 86400, 100_000)
        store.on_added = notifier.notify
        for i in range(args.events):
            t0 = time.monotonic()
            store.add("oom_kill", event, uids=[1001])
            product.append(rx.wait(base + i + 1) - t0)
        notifier.stop()
        store.close()

    ms = 1000.0
    print(f"{'event -> webhook received':32} {'median ms':>10} {'p99 ms':>8}")
    print(f"{'bare urllib POST (floor)':32} {statistics.median(floor) * ms:10.2f} {p99(floor) * ms:8.2f}")
    print(f"{'oomguard: store, hook, POST':32} {statistics.median(product) * ms:10.2f} {p99(product) * ms:8.2f}")
    print(f"ratio to the floor: median {statistics.median(product) / statistics.median(floor):.2f}x, "
          f"p99 {p99(product) / p99(floor):.2f}x ({args.events} events each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
