"""Warnings before the healer acts, on a real terminal (issue 11): the shop's
page stops answering while a user's protected run is alive. The run's owner
reads on the run's own terminal, and as "warning" events, that the shop is
down, which run, when the healer will stop it and how to stop it first;
again at the lead time; and that the warning is void once the shop
answers before the grace ends. The healer then kills nothing."""

from __future__ import annotations

import http.server
import threading
import time

import pytest
from daemon_fixture import BIN, start_daemon, wait_for
from terminal import Terminal

OOM_PROTECT = str(BIN / "oom-protect")
GRACE, WARN_BEFORE = 24, 12  # a wide margin between the lead-time warning and the kill, for TCG


class Shop:
    """A loopback page whose answer the test switches: 200 or 503."""

    def __init__(self) -> None:
        self.up = True
        shop = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200 if shop.up else 503)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def shop():
    s = Shop()
    yield s
    s.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, unpriv_user, shop):
    d = start_daemon(tmp_path_factory.mktemp("warn"), extra_toml=f"""
[healer]
grace = "{GRACE}s"
warn_before = "{WARN_BEFORE}s"
timezone = "UTC"
window = []
[[healer.check]]
name = "shop"
http = "{shop.url}"
interval = "0.5s"
timeout = "2s"
failures = 1
""")
    yield d
    d.stop()


def warnings_of(daemon, run_id: int) -> list[str]:
    return [e["data"]["action"] for e in daemon.cli_json("events", "--kind", "warning")
            if e["data"].get("run") == run_id]  # fmt: skip


def test_the_owner_is_warned_on_the_runs_terminal_then_told_the_warning_is_void(daemon, unpriv_user, shop):
    tty = Terminal(unpriv_user.uid)
    p = tty.popen(unpriv_user.argv([OOM_PROTECT, "sleep", "600"]), env=unpriv_user.env(OOMGUARD_SOCKET=daemon.socket))
    try:
        run = wait_for(lambda: next((r for r in daemon.runs(all=False) if r["pid"] == p.pid), None), timeout=60)
        assert run["tty"] and run["tty"].startswith("/dev/pts/")
        rid = run["id"]

        down_at = time.time()
        shop.up = False
        first = tty.wait_for(r"oomguard: the shop is down \(checks shop failing\)\. Your protected run "
                             rf"{rid} \([^)]*sleep 600\) will be stopped at (\d\d:\d\d:\d\d) UTC "
                             r"\(\S+ grace 24s\) unless the shop recovers\. "
                             rf"To stop it yourself: oomguard kill-run {rid}")  # fmt: skip
        # the time it names is the grace's end, as a local (here UTC) wall clock time
        acts_at = time.strptime(first.group(1), "%H:%M:%S")
        named = acts_at.tm_hour * 3600 + acts_at.tm_min * 60 + acts_at.tm_sec
        expected = (down_at + GRACE) % 86400
        assert abs((named - expected + 43200) % 86400 - 43200) <= 10, (first.group(1), expected)

        final = tty.wait_for(rf"Your protected run {rid} \([^)]*sleep 600\) will be stopped in (\d+)s, "
                             r"at (\d\d:\d\d:\d\d) UTC")  # fmt: skip
        assert int(final.group(1)) <= WARN_BEFORE and final.group(2) == first.group(1), tty.text
        shop.up = True
        tty.wait_for(rf"the shop is up again; your protected run {rid} will not be stopped \(the warning is void\)")
        assert warnings_of(daemon, rid) == ["down_warning", "final_warning", "warning_void"]
        told = [e["data"]["told_tty"] for e in daemon.cli_json("events", "--kind", "warning")
                if e["data"].get("run") == rid]  # fmt: skip
        assert told == [True, True, True]
        # the owner reads them too, through the socket, as their own events
        mine = unpriv_user.run([str(BIN / "oomguard"), "events", "--kind", "warning", "--json"],
                               env=unpriv_user.env(OOMGUARD_SOCKET=daemon.socket))  # fmt: skip
        assert mine.returncode == 0 and f'"run": {rid}' in mine.stdout

        time.sleep(2)  # a tick or four after the recovery: the healer must not act
        assert p.poll() is None
        assert not [e for e in daemon.cli_json("events", "--kind", "healer") if e["data"].get("run") == rid]
    finally:
        shop.up = True
        p.kill()
        p.wait(30)
        tty.close()
