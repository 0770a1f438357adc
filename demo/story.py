"""The demo's story, told as a timeline (run as root in the real-kernel guest
by demo/run).

v1: a memory-limited cgroup holds an ordinary process and a protected one;
memory runs out; the kernel kills the ordinary one and spares the protected one.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import textwrap
import time
from pathlib import Path

BIN = Path(sys.executable).parent
T0 = time.monotonic()
CG = Path("/sys/fs/cgroup/demo-app")


def say(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {text}", flush=True)


def user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--user-group", name], check=True)
        return pwd.getpwnam(name)


def in_cgroup_as(pw: pwd.struct_passwd, argv: list[str], **kw) -> subprocess.Popen:
    # setpriv execs; the cgroup is entered by writing our pid first
    return subprocess.Popen(
        ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--", *argv],
        preexec_fn=lambda: (CG / "cgroup.procs").write_text(str(os.getpid())),
        env={"PATH": os.environ["PATH"], "HOME": pw.pw_dir, "OOMGUARD_SOCKET": "/run/oomguard/protect.sock"},
        **kw,
    )


def main() -> int:
    app = user("app")
    say("a shop's app cgroup with memory.max = 100 MiB")
    CG.mkdir(exist_ok=True)
    (CG / "memory.max").write_text(str(100 << 20))
    (CG / "memory.swap.max").write_text("0")
    Path("/etc/oomguard").mkdir(exist_ok=True)
    daemon = subprocess.Popen([str(BIN / "oomguard"), "daemon"], stderr=open("/tmp/oomguard-daemon.log", "w"))
    while not Path("/run/oomguard/protect.sock").exists():
        time.sleep(0.05)
    say("oomguard daemon is up; the broker listens on /run/oomguard/protect.sock")

    ordinary = in_cgroup_as(app, [sys.executable, "-c", "x = bytearray(45 << 20)\nfor i in range(0, len(x), 4096): x[i] = 1\nimport time; time.sleep(600)"])
    say(f"app starts an ordinary job (pid {ordinary.pid}) that holds 45 MiB")
    time.sleep(3)
    hog_code = textwrap.dedent("""
        import os, time
        print(f"import running as pid {os.getpid()} with oom_score_adj", open("/proc/self/oom_score_adj").read().strip(), flush=True)
        chunks = []
        for n in range(70):
            c = bytearray(1 << 20)
            for i in range(0, len(c), 4096): c[i] = 1
            chunks.append(c)
        print(f"import done: {len(chunks)} MiB held, finished", flush=True)
    """)
    say("app runs: oom-protect python3 import.py  (it will want 70 MiB more)")
    hog = in_cgroup_as(app, [str(BIN / "oom-protect"), sys.executable, "-c", hog_code], stdout=subprocess.PIPE, text=True)
    for line in hog.stdout:
        say(f"  import: {line.strip()}")
    hog.wait()
    status = ordinary.wait(timeout=60)
    say(f"the ordinary job ended with {'SIGKILL from the OOM killer' if status == -9 else status}")
    events = dict(line.split() for line in (CG / "memory.events").read_text().splitlines())
    say(f"memory.events: oom={events['oom']} oom_kill={events['oom_kill']}; the protected import exited {hog.returncode}")
    daemon.terminate()
    daemon.wait()
    ok = status == -9 and hog.returncode == 0
    say("the kernel killed the ordinary job and spared the protected one" if ok else "unexpected outcome")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
