"""The oom-protect client on the host: everything up to the exec.

The host lacks CAP_SYS_RESOURCE, so a successful protected run is proven in
the guest (tests/guest/test_protect_guest.py); here every path that must
*not* run CMD is exercised against the real console script."""

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from oomguard import protect


def run(bin_path, env, *args, cwd=None):
    return subprocess.run(
        [str(bin_path / "oom-protect"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=30
    )


def test_help_and_version(bin_path, clean_env):
    r = run(bin_path, clean_env, "--help")
    assert r.returncode == 0 and "usage: oom-protect" in r.stdout and "125" in r.stdout
    r = run(bin_path, clean_env, "--version")
    assert r.returncode == 0 and "0.1.0" in r.stdout


def test_hypernode_name_is_the_same_client(bin_path, clean_env):
    r = subprocess.run([str(bin_path / "hypernode-oom-protect"), "--version"], env=clean_env, capture_output=True, text=True)
    assert r.returncode == 0 and "oom-protect (oomguard)" in r.stdout


def test_not_found_is_127(bin_path, clean_env):
    r = run(bin_path, clean_env, "no-such-command-xyz")
    assert r.returncode == 127 and "no-such-command-xyz: command not found" in r.stderr


def test_not_executable_is_126(bin_path, clean_env, tmp_path):
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\ntouch ran\n")
    script.chmod(0o644)
    r = run(bin_path, clean_env, str(script), cwd=tmp_path)
    assert r.returncode == 126 and "permission denied" in r.stderr
    r = run(bin_path, clean_env, str(tmp_path), cwd=tmp_path)  # a directory
    assert r.returncode == 126
    assert not (tmp_path / "ran").exists()


def test_unknown_option_is_refused_not_passed_on(bin_path, clean_env, tmp_path):
    r = run(bin_path, clean_env, "-x", "touch", "ran", cwd=tmp_path)
    assert r.returncode == 125 and "unknown option '-x'" in r.stderr
    assert not (tmp_path / "ran").exists()


def test_double_dash_takes_the_next_word_as_cmd(bin_path, clean_env):
    r = run(bin_path, clean_env, "--", "--help")
    assert r.returncode == 127 and "--help: command not found" in r.stderr


def test_no_daemon_is_125_and_cmd_does_not_run(bin_path, clean_env, tmp_path):
    r = run(bin_path, clean_env, "touch", "ran", cwd=tmp_path)
    assert r.returncode == 125
    assert "daemon is not running" in r.stderr and "touch not run" in r.stderr
    assert r.stderr.count("\n") == 1  # one line that says why
    assert not (tmp_path / "ran").exists()


class FakeBroker:
    """A socket that answers every request with a fixed line."""

    def __init__(self, path, reply: bytes):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.reply = reply
        self.requests = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.requests.append(conn.recv(4096))
            conn.sendall(self.reply)
            conn.close()


def test_grant_that_did_not_take_is_125(bin_path, clean_env, tmp_path):
    """The client trusts only what it reads back from /proc/self/oom_score_adj."""
    broker = FakeBroker(tmp_path / "b.sock", b'{"ok": true, "run": 1}\n')
    clean_env["OOMGUARD_SOCKET"] = str(tmp_path / "b.sock")
    r = run(bin_path, clean_env, "touch", "ran", cwd=tmp_path)
    assert r.returncode == 125 and "protection did not take: oom_score_adj reads 0" in r.stderr
    assert not (tmp_path / "ran").exists()
    assert json.loads(broker.requests[0]) == {"op": "protect", "v": 1}


@pytest.mark.parametrize(
    "reply, message",
    [
        (b'{"ok": false, "error": "user bob (uid 1001) is not allowed"}\n', "user bob (uid 1001) is not allowed"),
        (b"not json\n", "malformed answer"),
        (b"", "closed the connection without an answer"),
    ],
)
def test_broker_refusals_are_125_with_reason(bin_path, clean_env, tmp_path, reply, message):
    FakeBroker(tmp_path / "b.sock", reply)
    clean_env["OOMGUARD_SOCKET"] = str(tmp_path / "b.sock")
    r = run(bin_path, clean_env, "touch", "ran", cwd=tmp_path)
    assert r.returncode == 125 and message in r.stderr
    assert not (tmp_path / "ran").exists()


def test_original_environ_ignores_python_locale_coercion():
    code = "from oomguard.protect import original_environ; import os; print(sorted(original_environ())); print('LC_CTYPE' in os.environ)"
    out = subprocess.run(
        ["env", "-i", "LANG=C", f"PYTHONPATH={os.pathsep.join(sys.path)}", sys.executable, "-c", code],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    assert out[0] == "[b'LANG', b'PYTHONPATH']"
    assert out[1] == "True"  # Python did add it to its own view


def test_find_command_searches_path_like_a_shell(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "tool").write_text("")  # not executable: skipped, remembered
    (b / "tool").write_text("#!/bin/sh\n")
    (b / "tool").chmod(0o755)
    env = {b"PATH": f"{a}:{b}".encode()}
    assert protect.find_command(b"tool", env) == str(b / "tool").encode()
    (b / "tool").chmod(0o644)
    with pytest.raises(PermissionError):
        protect.find_command(b"tool", env)
    with pytest.raises(FileNotFoundError):
        protect.find_command(b"missing", env)


def test_hot_path_imports_almost_nothing():
    code = "import sys; before = set(sys.modules); import oomguard.protect; print(sorted(set(sys.modules) - before))"
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": os.path.dirname(os.path.dirname(protect.__file__))})
    added = set(eval(out.stdout))
    assert added <= {"oomguard", "oomguard.protect"}, added
