"""The CLI's start-up fast path (cli/fast.py) against the argparse path:
the same argv must mean the same thing, find the same socket, and print the
same output with the same exit code for the same reply."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from oomguard import cli, config
from oomguard.cli import client, commands, fast
from oomguard.config import dropins
from oomguard.forensics import eventschema
from oomguard.forensics.events import parse_since

REPO = Path(__file__).resolve().parents[2]
NOW = 1_795_928_345.5


def test_the_copied_constants_agree_with_their_owners():
    assert fast.DEFAULT_CONFIG == str(config.DEFAULT_PATH)
    assert fast.MAX_BYTES == config.MAX_BYTES
    assert fast.DROPIN_SUFFIX == dropins.SUFFIX
    assert client.MAX_PAGE == eventschema.MAX_PAGE


# ---------------------------------------------------------------- the argv


TOKENS = ["runs", "events", "status", "top", "-n", "3", "x", "-3", "--all", "--json", "--config", "/c.toml",
          "--since", "1d", "--kind", "oom_kill", "--limit", "7", "--help", "--al", "--json=1", "--", ""]  # fmt: skip


def argparse_view(argv: list[str]) -> dict | None:
    try:
        ns = commands.parser().parse_args(argv)
    except SystemExit:
        return None
    return {"command": ns.command, "config": ns.config, "id": getattr(ns, "id", None),
            "all": getattr(ns, "all", False), "json": getattr(ns, "json", False),
            "since": getattr(ns, "since", None), "kind": getattr(ns, "kind", None) or [],
            "limit": getattr(ns, "limit", 1000)}


def test_every_argv_the_fast_path_takes_means_the_same_to_argparse(capsys):
    rng = random.Random(12)
    argvs = [[rng.choice(TOKENS) for _ in range(rng.randint(1, 6))] for _ in range(2000)]
    argvs += [["--config", "/a.toml"] * rng.randint(0, 1) + [rng.choice(["runs", "events", "status", "top"])]
              + [rng.choice(TOKENS) for _ in range(rng.randint(0, 5))] for _ in range(3000)]  # fmt: skip
    argvs += [[c, *rest] for c in ("runs", "events", "status", "top") for rest in
              ([], ["--json"], ["--config", "/c.toml"], ["--all"], ["3"], ["3", "--all"], ["--all", "3"])]  # fmt: skip
    taken = 0
    for argv in argvs:
        mine = fast.parse(argv)
        if mine is None:
            continue
        taken += 1
        assert argparse_view(argv) == mine, argv
    capsys.readouterr()  # argparse's usage errors
    assert taken > 200  # the comparison is not vacuous


@pytest.mark.parametrize("argv", [
    ["runs", "--all", "3"],  # an error to argparse: the id comes too late
    ["runs", "--al"], ["runs", "--json=1"], ["status", "--help"], ["--version"], ["events", "--limit", "-1"],
    ["events", "--since", "-1d"], ["top", "--cgroup", "/x"], ["top", "-n", "-3"], ["runs", "3", "4"], ["--config", "runs"], ["runs", "--config", ""],
])  # fmt: skip
def test_what_the_fast_path_leaves_to_argparse(argv):
    assert fast.parse(argv) is None


@pytest.mark.parametrize("text", ["1d", "90s", "3m", "2h", " 1d ", "0s", "36500d"])
def test_since_as_the_store_parses_it(text):
    assert fast.since_of(text, NOW) == parse_since(text, NOW)


@pytest.mark.parametrize("text", ["1.5h", "250ms", "2024-05-01", "90", "1 d", "d", "١d", "1w"])
def test_since_forms_left_to_the_store(text):
    assert fast.since_of(text, NOW) is None


# ---------------------------------------------------------------- the socket

SHIPPED = (REPO / "contrib/config/oomguard.toml").read_text()


@pytest.mark.parametrize(("files", "expect"), [
    ({"main": SHIPPED}, "default"),  # the shipped file only mentions it in a comment
    ({}, "default"),  # no config file at all
    ({"main": "[protect]\nsocket = '/run/x.sock'\n"}, "schema"),
    ({"main": SHIPPED, "d/50-site.toml": "protect.socket = '/run/y.sock'\n"}, "schema"),
    ({"main": SHIPPED, "d/50-site.toml": "[healer]\n'\\u0073ocket' = 1\n"}, "schema"),
    ({"main": "[protect]\nsocket = 'relative'\n"}, "schema"),  # invalid: the schema says default
    ({"main": "not toml ["}, "default"),
    ({"main": b"\xff\xfe"}, "default"),
    ({"main": SHIPPED, "d/50-site.toml": "[metrics]\nlisten = '0.0.0.0:1'\n"}, "default"),  # invalid config
    ({"main": SHIPPED, "d/.hidden.toml": "protect.socket = '/run/y.sock'\n", "d/x.bak": "socket"}, "default"),
    ({"main": "[protect] # socket\nallow_users = ['app']\n"}, "schema"),  # a trailing comment counts
])  # fmt: skip
def test_the_socket_is_the_schemas_or_left_to_it(tmp_path, monkeypatch, files, expect):
    monkeypatch.delenv("OOMGUARD_SOCKET", raising=False)
    main = tmp_path / "oomguard.toml"
    for name, text in files.items():
        p = main if name == "main" else tmp_path / ("oomguard.toml." + name)
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
    ns = commands.parser().parse_args(["--config", str(main), "runs"])
    found = fast.find_socket(str(main))
    if expect == "default":
        assert found == commands._socket(ns) == client.DEFAULT_SOCKET
    else:
        assert found is None


def test_a_config_that_is_not_a_file_or_not_there_means_the_default(tmp_path, monkeypatch):
    monkeypatch.delenv("OOMGUARD_SOCKET", raising=False)
    for path in (tmp_path, tmp_path / "missing.toml"):
        ns = commands.parser().parse_args(["--config", str(path), "runs"])
        assert fast.find_socket(str(path)) == commands._socket(ns) == client.DEFAULT_SOCKET


def test_the_environment_wins_as_in_the_client(tmp_path, monkeypatch):
    monkeypatch.setenv("OOMGUARD_SOCKET", "/tmp/env.sock")
    (tmp_path / "c.toml").write_text("[protect]\nsocket = '/run/x.sock'\n")
    assert fast.find_socket(str(tmp_path / "c.toml")) == client.socket_path("/run/x.sock") == "/tmp/env.sock"


# ---------------------------------------------------------------- the output

RUN = {"id": 3, "user": "shop\x1b]0;x\x07user", "uid": 1001, "pid": 900, "command": "php import.php " + "y" * 80,
       "cgroup": "/oomguard.app/oomguard-run-3", "tty": None, "started": NOW - 60, "ended": None,
       "exit_status": None, "peak_memory": None, "end_reason": None}  # fmt: skip
EVENT = {"id": 7, "ts": NOW, "kind": "oom_kill", "uids": [1001],
         "data": {"victim_pid": 4242, "victim_comm": "php-fpm8.2", "victim_uid": 1001, "anon_rss_kb": 1,
                  "oom_memcg": "/oomguard.app", "protected_runs": [{"id": 3, "user": "shopuser"}]}}  # fmt: skip
REPORT = {"run": RUN, "running": True, "duration": 61.0, "peak_memory": None, "ended_by": None, "oom_kills": []}
STATUS = {"memory": {"total": 1 << 30, "available": 1 << 28}, "runs": [RUN], "protected": [{"pid": 900}],
          "healer": {"phase": "watching", "checks": {"shop": {"healthy": True, "down": False, "detail": "ok"}}},
          "last_oom_kills": [EVENT], "daemon": {"pid": 1, "process_events": "events"}}  # fmt: skip


class Stub:
    """A daemon that answers every request with ``reply`` and keeps what it was asked."""

    def __init__(self, path: Path, reply: dict):
        self.reply, self.asked = reply, []
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(8)
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while not buf.endswith(b"\n"):
                    buf += conn.recv(65536) or b"\n"
                self.asked.append(json.loads(buf))
                conn.sendall(json.dumps(self.reply).encode())


def both_ways(argv: list[str], capsys) -> tuple[tuple, tuple]:
    rc = fast.run(argv)
    assert rc is not None, "the fast path took it"
    got_fast = (rc, *capsys.readouterr())
    got_full = (commands.main(argv), *capsys.readouterr())
    return got_fast, got_full


@pytest.mark.parametrize(("argv", "reply"), [
    (["runs"], {"ok": True, "runs": [RUN, dict(RUN, id=4, ended=NOW, exit_status=-9)]}),
    (["runs", "--all"], {"ok": True, "runs": []}),
    (["runs"], {"ok": True, "runs": []}),
    (["runs", "--json"], {"ok": True, "runs": [RUN]}),
    (["runs", "3"], {"ok": True, "report": REPORT}),
    (["runs", "3", "--json"], {"ok": True, "report": REPORT}),
    (["runs", "9"], {"ok": False, "error": "no run 9 of yours"}),
    (["events"], {"ok": True, "events": [EVENT], "next": None}),
    (["events", "--kind", "oom_kill", "--limit", "5", "--json"], {"ok": True, "events": [EVENT], "next": None}),
    (["events"], {"ok": True, "events": [], "next": None}),
    (["status"], {"ok": True, **STATUS}),
    (["status", "--json"], {"ok": True, **STATUS}),
    (["runs"], {"nonsense": 1}),
])  # fmt: skip
def test_the_same_reply_prints_the_same_both_ways(tmp_path, monkeypatch, capsys, argv, reply):
    sock = tmp_path / "s.sock"
    monkeypatch.setenv("OOMGUARD_SOCKET", str(sock))
    stub = Stub(sock, reply)
    got_fast, got_full = both_ways(["--config", str(tmp_path / "none.toml"), *argv], capsys)
    assert got_fast == got_full
    assert got_fast[1] or got_fast[2]  # it printed something
    asked_fast, asked_full = stub.asked[: len(stub.asked) // 2], stub.asked[len(stub.asked) // 2 :]
    assert asked_fast == asked_full  # the same requests, too


def test_since_asks_for_the_same_cutoff(tmp_path, monkeypatch, capsys):
    sock = tmp_path / "s.sock"
    monkeypatch.setenv("OOMGUARD_SOCKET", str(sock))
    monkeypatch.setattr("time.time", lambda: NOW)
    stub = Stub(sock, {"ok": True, "events": [EVENT], "next": None})
    got_fast, got_full = both_ways(["events", "--since", "2h"], capsys)
    assert got_fast == got_full
    assert [a["since"] for a in stub.asked] == [NOW - 7200] * 2


@pytest.mark.parametrize("argv", [["runs"], ["events"], ["status"], ["status", "--json"]])
def test_no_daemon_both_ways(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.setenv("OOMGUARD_SOCKET", str(tmp_path / "none.sock"))
    (tmp_path / "c.toml").write_text("")
    got_fast, got_full = both_ways(["--config", str(tmp_path / "c.toml"), *argv], capsys)
    if argv[0] == "status":  # this host's own scan: memory moves between the two
        got_fast, got_full = (tuple(unmoving(x) for x in got) for got in (got_fast, got_full))
    assert got_fast == got_full
    if argv[0] == "status":
        out = got_fast[1]
        assert got_fast[0] == 0
        assert out["daemon"] is None if isinstance(out, dict) else any("not reachable" in line for line in out)
    else:
        assert got_fast[0] == 1 and "daemon is not running" in got_fast[2]


def unmoving(out: object) -> object:
    """Status output without the figures that change from one scan to the next."""
    if not isinstance(out, str) or not out:
        return out
    if out.startswith("{"):
        data = json.loads(out)
        return {k: v for k, v in data.items() if k not in ("memory", "pressure")}
    return [line for line in out.splitlines() if not line.startswith(("memory", "pressure"))]


def test_status_without_daemon_and_a_bad_config_both_ways(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OOMGUARD_SOCKET", str(tmp_path / "none.sock"))
    bad = tmp_path / "c.toml"
    bad.write_text("[metrics]\nlisten = '0.0.0.0:1'\n")
    got_fast, got_full = both_ways(["status", "--config", str(bad)], capsys)
    assert got_fast == got_full
    assert got_fast[0] == 2 and "not a loopback address" in got_fast[2]


def test_a_query_imports_neither_argparse_nor_the_config(tmp_path):
    code = ("import sys; from oomguard import cli; rc = cli.main(['runs']); "
            "print(rc, sorted(m for m in sys.modules if m.startswith(('oomguard.config', 'argparse', 'oomguard.cli.commands'))))")  # fmt: skip
    env = {"OOMGUARD_SOCKET": str(tmp_path / "none.sock"), "PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "1 []"  # the daemon is not running: exit 1, as the argparse path


def test_main_routes_to_argparse_when_the_fast_path_declines(monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["runs", "--help"])
    assert e.value.code == 0 and "include ended runs" in capsys.readouterr().out


# ---------------------------------------------------------------- the wire, without json's import

REQUESTS = [
    {"op": "runs", "all": False}, {"op": "runs", "id": 3}, {"op": "status"},
    {"op": "events", "limit": 1000, "page": 500, "before": None, "since": NOW - 86400.0, "kinds": ["oom_kill", "é\x1b"]},
    {"op": "events", "since": 1e300, "kinds": None, "x": [1.5, -0.0, float("inf"), float("nan"), True, "\ud800"]},
]  # fmt: skip


@pytest.mark.parametrize("request_", REQUESTS)
def test_requests_are_encoded_as_json_dumps_encodes_them(request_):
    assert client.encode(request_) == json.dumps(request_)


def test_what_json_cannot_encode_fails_as_in_json():
    with pytest.raises(TypeError, match="Object of type set is not JSON serializable"):
        client.encode({"op": {1}})


REPLIES = [
    json.dumps({"ok": True, "runs": [RUN], "n": 1.25, "big": 10**30, "neg": -3, "e": 1e-7}).encode(),
    json.dumps({"ok": True, "s": "é\x1b\u2028", "nested": [[{"a": None}]]}).encode(),
    json.dumps({"ok": True, "s": "é"}, ensure_ascii=False).encode(),
    b'{"ok": true}\n', b'{"ok": true}  \r\n\t', b'{"ok": NaN, "x": -Infinity}', b'{"a": "\\ud800"}',
    b"[1]", b" {}", b"null",  # not the daemon's shape: json.loads itself decodes them
]  # fmt: skip
MALFORMED = [b"", b"{", b'{"ok": true} x', b'{"ok": true}{}', b"{'ok': 1}", b'{"a": 01}', b'{"a": "\x01"}',
             b"\xff\xfe", b'{"a": "\xff"}', b"{\x00"]  # fmt: skip


@pytest.mark.parametrize("raw", REPLIES)
def test_replies_decode_as_json_loads_decodes_them(raw):
    got, want = client.decode(raw), json.loads(raw)
    assert json.dumps(got) == json.dumps(want)  # NaN != NaN: compared as text
    assert type(got) is type(want)


@pytest.mark.parametrize("raw", MALFORMED)
def test_what_json_loads_refuses_is_refused(raw):
    with pytest.raises(ValueError):
        json.loads(raw)
    with pytest.raises(ValueError):
        client.decode(raw)


def test_a_reply_on_the_wire_imports_neither_json_nor_re(tmp_path):
    sock = tmp_path / "s.sock"
    env = {"OOMGUARD_SOCKET": str(sock), "PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    server = Stub(sock, {"ok": True, "runs": [RUN]})
    probe = ("import sys; from oomguard import cli; rc = cli.main(['runs']); "
             "print(rc, sorted(m for m in ('json', 're', 'socket', 'argparse', 'oomguard.config') if m in sys.modules), "
             "file=sys.stderr)")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert r.stderr.strip() == "0 []" and "RUN" in r.stdout and server.asked == [{"op": "runs", "all": False}]


def test_top_takes_the_fast_path_and_prints_the_argparse_paths_table(capsys):
    code = ("import sys; from oomguard import cli; rc = cli.main(['top', '-n', '3']); "
            "print(rc, sorted(m for m in sys.modules if m.startswith(('oomguard.config', 'argparse', 'oomguard.cli.commands'))))")  # fmt: skip
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    lines = out.splitlines()
    assert len(lines) == 5 and lines[-1] == "0 []"
    assert commands.main(["top", "-n", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == lines[0]  # the same table's header
