"""oom-protect and its broker against the real kernel, as real root and a real
unprivileged user (runs in the guest)."""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from daemon_fixture import BIN, wait_for

PY = sys.executable
OOM_PROTECT = str(BIN / "oom-protect")


def as_user(user, daemon, cmd, **kw):
    return user.run(cmd, env=user.env(OOMGUARD_SOCKET=daemon.socket), **kw)



def adj(pid: int) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


# ---------------------------------------------------------------- protection


def test_unprivileged_user_gets_minus_1000_and_children_inherit_it(daemon, unpriv_user):
    script = "cat /proc/self/oom_score_adj; sh -c 'cat /proc/self/oom_score_adj'"
    r = as_user(unpriv_user, daemon, ["sh", "-c", f"{OOM_PROTECT} sh -c \"{script}\"; cat /proc/self/oom_score_adj"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["-1000", "-1000", "0"], r.stderr  # CMD, its child, then the caller


def test_protected_run_survives_while_the_kernel_kills_an_ordinary_process(daemon, unpriv_user, cgroup, kmsg):
    cgroup.write("memory.max", 100 << 20)
    cgroup.write("memory.swap.max", 0)
    ready = Path("/tmp/victim-ready")
    ready.unlink(missing_ok=True)
    victim_code = textwrap.dedent(f"""
        import time
        data = bytearray(45 << 20)
        for i in range(0, len(data), 4096): data[i] = 1
        open("{ready}", "w").close()
        time.sleep(600)
    """)
    hog_code = textwrap.dedent("""
        chunks = []
        for _ in range(60):
            chunk = bytearray(1 << 20)
            for i in range(0, len(chunk), 4096): chunk[i] = 1
            chunks.append(chunk)
        print("hog done", sum(len(c) for c in chunks) >> 20)
    """)
    victim = cgroup.popen(unpriv_user.argv([PY, "-c", victim_code]), env=unpriv_user.env())
    wait_for(ready.exists, timeout=120)
    hog = cgroup.popen(
        unpriv_user.argv([OOM_PROTECT, PY, "-c", hog_code]),
        env=unpriv_user.env(OOMGUARD_SOCKET=daemon.socket), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, _ = hog.communicate(timeout=300)
    assert hog.returncode == 0 and "hog done 60" in out
    assert victim.wait(timeout=60) == -signal.SIGKILL
    assert cgroup.stat("memory.events")["oom_kill"] >= 1
    kmsg.wait_for(rf"Killed process {victim.pid}\b")
    assert not any(f"Killed process {hog.pid} " in line for line in kmsg.lines)


def test_user_not_allowed_gets_125_and_the_command_does_not_run(daemon, other_user, tmp_path):
    marker = Path("/tmp/other-ran")
    marker.unlink(missing_ok=True)
    r = as_user(other_user, daemon, [OOM_PROTECT, "touch", str(marker)])
    assert r.returncode == 125
    assert "otheruser" in r.stderr and "not in [protect] allow_users" in r.stderr
    assert not marker.exists()
    assert "refused protection" in daemon.log_text() and f"uid={other_user.uid}" in daemon.log_text()


def test_exit_codes_127_126_and_the_commands_own(daemon, unpriv_user):
    assert as_user(unpriv_user, daemon, [OOM_PROTECT, "no-such-cmd"]).returncode == 127
    assert as_user(unpriv_user, daemon, [OOM_PROTECT, "/etc/hostname"]).returncode == 126
    assert as_user(unpriv_user, daemon, [OOM_PROTECT, "sh", "-c", "exit 42"]).returncode == 42


def test_the_command_replaces_the_client_with_the_same_environment(daemon, unpriv_user, tmp_path):
    """Same pid (exec, no extra process), same environment byte for byte even
    with LANG=C (Python would coerce it), same cwd, same ignored signals."""
    workdir = unpriv_user.home
    env = {**unpriv_user.env(OOMGUARD_SOCKET=daemon.socket), "LANG": "C", "ODD": "a b\tc"}
    env.pop("LC_CTYPE", None)
    # The probe reads /proc/self/environ: its own os.environ would show Python's coercion.
    probe = [PY, "-I", "-c", "import os,json;print(json.dumps([os.getpid(),"
             "sorted(open('/proc/self/environ','rb').read().decode().split(chr(0))),os.getcwd(),"
             "[l for l in open('/proc/self/status') if l.startswith(('SigIgn','SigBlk'))]]))"]  # fmt: skip
    direct = subprocess.run(unpriv_user.argv(probe), env=env, cwd=workdir, capture_output=True, text=True)
    p = subprocess.Popen(unpriv_user.argv([OOM_PROTECT, *probe]), env=env, cwd=workdir, stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=60)
    pid, wrapped_env, cwd, sigs = json.loads(out)
    d_pid, direct_env, d_cwd, d_sigs = json.loads(direct.stdout)
    assert wrapped_env == direct_env
    assert "LANG=C" in wrapped_env and not any(v.startswith("LC_CTYPE=") for v in wrapped_env)
    assert cwd == d_cwd == str(workdir)
    assert sigs == d_sigs  # SIGPIPE is not left ignored by Python
    # setpriv execs too, so the Popen pid is the process that became oom-protect then CMD
    assert pid == p.pid


def test_signals_reach_the_command_and_the_status_is_its_own(daemon, unpriv_user):
    p = subprocess.Popen(unpriv_user.argv([OOM_PROTECT, "sleep", "300"]), env=unpriv_user.env(OOMGUARD_SOCKET=daemon.socket))
    wait_for(lambda: Path(f"/proc/{p.pid}/comm").read_text().strip() == "sleep", timeout=60)
    assert adj(p.pid) == -1000
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == -signal.SIGTERM


def test_controlling_terminal_is_kept(daemon, unpriv_user):
    code = "import os; print(os.ttyname(0), os.tcgetpgrp(0) == os.getpgrp())"

    def in_pty(argv):
        pid, fd = pty.fork()
        if pid == 0:
            os.execvpe(argv[0], argv, unpriv_user.env(OOMGUARD_SOCKET=daemon.socket))
        out = b""
        while True:
            try:
                chunk = os.read(fd, 1024)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        os.waitpid(pid, 0)
        os.close(fd)
        return out.decode().split()

    direct = in_pty(unpriv_user.argv([PY, "-c", code]))
    wrapped = in_pty(unpriv_user.argv([OOM_PROTECT, PY, "-c", code]))
    assert wrapped[1] == direct[1] == "True"  # still the foreground job of its own tty
    assert wrapped[0].startswith("/dev/pts/")


def test_only_the_asking_process_is_protected_whatever_the_request_says(daemon, unpriv_user):
    """An already running process cannot be marked: a "pid" in the request is ignored."""
    sleeper = subprocess.Popen(unpriv_user.argv(["sleep", "60"]))
    code = textwrap.dedent(f"""
        import socket
        s = socket.socket(socket.AF_UNIX); s.connect({daemon.socket!r})
        s.sendall(b'{{"op": "protect", "pid": {sleeper.pid}}}\\n')
        print(s.makefile().readline().strip())
        print(open("/proc/self/oom_score_adj").read().strip())
    """)
    try:
        r = as_user(unpriv_user, daemon, [PY, "-c", code])
        reply, own = r.stdout.splitlines()
        assert json.loads(reply)["ok"] is True and own == "-1000"
        assert adj(sleeper.pid) == 0
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------- the broker


def test_a_dead_peer_gets_nothing_even_when_its_pid_is_reused_at_once(daemon, unpriv_user, tmp_path):
    """The peer connects, hands its socket to a child and dies; its pid is
    reused at once by another process of the same user (ns_last_pid); then
    the request arrives. Nothing may be protected."""
    shared = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's tmp_path is 0700: the user can't reach it
    shared.chmod(0o777)
    go, reply = shared / "go", shared / "reply"
    peer_code = textwrap.dedent(f"""
        import os, socket, time
        s = socket.socket(socket.AF_UNIX); s.connect({daemon.socket!r})
        if os.fork() == 0:
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2): os.dup2(null, fd)
            while not os.path.exists({str(go)!r}): time.sleep(0.01)
            s.sendall(b'{{"op": "protect"}}\\n')
            open({str(reply)!r}, "w").write(s.makefile().readline())
            os._exit(0)
        print(os.getpid(), flush=True)
        os._exit(0)
    """)
    peer = subprocess.run(unpriv_user.argv([PY, "-c", peer_code]), capture_output=True, text=True, timeout=60)
    dead_pid = int(peer.stdout)
    for _ in range(20):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(dead_pid - 1))
        reuser = subprocess.Popen(unpriv_user.argv(["sleep", "120"]))
        if reuser.pid == dead_pid:
            break
        reuser.kill()
        reuser.wait()
    assert reuser.pid == dead_pid, "could not force pid reuse"
    try:
        go.touch()
        answer = json.loads(wait_for(lambda: reply.exists() and reply.read_text(), timeout=60))
        assert answer["ok"] is False and "gone" in answer["error"]
        assert adj(reuser.pid) == 0
    finally:
        reuser.kill()
        reuser.wait()


def test_malformed_requests_leave_the_daemon_serving(daemon, unpriv_user):
    for junk in (b"garbage\n", b"\x00" * 10000, b'{"op": "protect", "pid": 1}', b"[" * 4000 + b"\n"):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(daemon.socket)
        try:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            assert b'"ok": false' in s.makefile("rb").readline()
        finally:
            s.close()
    assert daemon.proc.poll() is None
    r = as_user(unpriv_user, daemon, [OOM_PROTECT, "cat", "/proc/self/oom_score_adj"])
    assert r.returncode == 0 and r.stdout.strip() == "-1000"


def test_grant_gets_its_own_cgroup_and_the_exit_status_is_recorded(daemon, unpriv_user, cgroup):
    cgroup.write("memory.max", 200 << 20)
    p = cgroup.popen(
        unpriv_user.argv([OOM_PROTECT, "sh", "-c", "cat /proc/self/cgroup; exit 7"]),
        env=unpriv_user.env(OOMGUARD_SOCKET=daemon.socket), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 7
    own = out.strip().removeprefix("0::")
    caller = "/" + str(cgroup.path.relative_to("/sys/fs/cgroup"))
    assert own.startswith(caller + "/oomguard-run-")  # nested: the caller's limit still applies

    def ended():
        runs = [r for r in daemon.runs() if r["pid"] == p.pid]
        return runs if runs and runs[0]["ended"] else None

    run = wait_for(ended, timeout=60)[0]
    assert run["exit_status"] == 7 and run["user"] == "shopuser" and run["cgroup"] == own
    assert not Path("/sys/fs/cgroup" + own).exists()  # removed once empty


def test_screen_run_is_tracked_after_the_screen_client_exits(daemon, unpriv_user):
    screendir = unpriv_user.home / ".screen"
    r = unpriv_user.run(
        [OOM_PROTECT, "screen", "-d", "-m", "-S", "imp", "sleep", "300"],
        env=unpriv_user.env(OOMGUARD_SOCKET=daemon.socket, SCREENDIR=str(screendir)),
    )
    assert r.returncode == 0, r.stderr
    sleeper = wait_for(
        lambda: next((int(p) for p in os.listdir("/proc") if p.isdigit() and _is(int(p), "sleep", unpriv_user.uid)), None),
        timeout=60,
    )
    assert adj(sleeper) == -1000
    time.sleep(1.5)  # the reaper runs every 0.5 s: the run must stay active
    run = next(r for r in daemon.runs(all=False) if r["user"] == "shopuser" and "screen" in r["command"])
    assert run["ended"] is None
    cg = Path("/sys/fs/cgroup" + run["cgroup"])
    assert sleeper in [int(x) for x in (cg / "cgroup.procs").read_text().split()]
    (cg / "cgroup.kill").write_text("1")
    ended = wait_for(lambda: next((r for r in daemon.runs() if r["id"] == run["id"] and r["ended"]), None), timeout=60)
    assert ended["end_reason"] == "exited"
    assert ended["peak_memory"] and ended["peak_memory"] > 100_000  # screen + sleep, sampled


def _is(pid: int, comm: str, uid: int) -> bool:
    try:
        st = os.stat(f"/proc/{pid}")
        return st.st_uid == uid and Path(f"/proc/{pid}/comm").read_text().strip() == comm
    except OSError:
        return False


def test_runs_are_private_to_their_owner(daemon, unpriv_user, other_user):
    as_user(unpriv_user, daemon, [OOM_PROTECT, "true"])
    mine = as_user(unpriv_user, daemon, [str(BIN / "oomguard"), "runs", "--all", "--json"])
    theirs = as_user(other_user, daemon, [str(BIN / "oomguard"), "runs", "--all", "--json"])
    assert mine.returncode == 0 and theirs.returncode == 0, (mine.stderr, theirs.stderr)
    assert json.loads(mine.stdout) and all(r["user"] == "shopuser" for r in json.loads(mine.stdout))
    assert json.loads(theirs.stdout) == []
    assert {r["user"] for r in daemon.runs()} >= {"shopuser"}


def test_a_caller_with_cap_sys_resource_needs_no_daemon(tmp_path):
    env = {**os.environ, "OOMGUARD_SOCKET": str(tmp_path / "no-daemon.sock")}
    r = subprocess.run([OOM_PROTECT, "sh", "-c", "cat /proc/self/oom_score_adj; exit 3"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout.strip(), r.stderr) == (3, "-1000", "")
