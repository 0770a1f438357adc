"""oom-protect: run a command that the kernel OOM killer always skips.

    oom-protect [--report] [--memory-max SIZE] [--] CMD [ARGS...]

The process that runs this file gets oom_score_adj -1000 (written directly
when it holds CAP_SYS_RESOURCE, granted by the oomguard broker otherwise),
reads the value back, and then execs CMD in its own place: same pid, same
environment, working directory, file descriptors and terminal, so the exit
status and signals are CMD's own. Children inherit the value. Nothing else
is protected: not the shell that typed the command, and not any process
that is already running.

This is the hot path of a tool whose start-up time is measured: it imports
nothing beyond os, sys and the C socket and signal modules, and nothing imports it.
"""

import os
import sys

VERSION = "0.1.0"
PROG = "oom-protect"
SOCKET = "/run/oomguard/protect.sock"
PROTECTED = -1000

# Exit codes, as env(1), nice(1) and timeout(1) use them.
EXIT_FAILED = 125  # protection could not be obtained, or a usage error
EXIT_CANNOT_RUN = 126
EXIT_NOT_FOUND = 127

MIN_MEMORY_MAX = 1 << 20  # as the broker's config.broker.MIN_MEMORY_MAX
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

USAGE = f"""usage: {PROG} [--report] [--memory-max SIZE] [--] CMD [ARGS...]

Run CMD with oom_score_adj -1000, so that the kernel's OOM killer never
picks it or any process it starts. CMD keeps your environment, working
directory, terminal, exit status and signals. Already running processes
cannot be protected, and the shell you type this in is not.

options:
  --report       when the run ends, the daemon writes its summary (duration,
                 peak memory, OOM kills while it ran) to this terminal
  --memory-max SIZE
                 a memory budget for CMD and all it starts (512M, 2G; swap
                 included): at the budget the daemon stops the run at once,
                 so the rest of the server never pays for it
  -h, --help     show this help and exit
  -V, --version  show the version and exit

exit status: CMD's own; 125 if protection could not be obtained (CMD is
then not run), 126 if CMD cannot be executed, 127 if CMD is not found.
The broker's socket is {SOCKET}, or $OOMGUARD_SOCKET."""


class Refused(Exception):
    """Protection could not be obtained; the message says why."""


def _fail(code: int, message: str) -> int:
    try:
        os.write(2, f"{PROG}: {message}\n".encode(errors="replace"))
    except OSError:
        pass
    return code


def original_environ() -> dict[bytes, bytes]:
    """The environment exactly as this process received it.

    Python may add to os.environ at start-up (PEP 538 sets LC_CTYPE when it
    coerces a C locale); /proc/self/environ still holds what execve passed."""
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return dict(os.environb)
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            env[key] = value
    return env


def find_command(cmd: bytes, env: dict[bytes, bytes]) -> bytes:
    """The path execve will run, as a shell would look it up.

    Raises FileNotFoundError (127) or PermissionError (126)."""
    if b"/" in cmd:
        candidates = [cmd]
    else:
        path = env.get(b"PATH", b"/usr/local/bin:/usr/bin:/bin")
        candidates = [(d or b".") + b"/" + cmd for d in path.split(b":")]
    denied = None
    for c in candidates:
        try:
            st = os.stat(c)
        except OSError:
            continue
        if (st.st_mode & 0o170000) == 0o100000 and os.access(c, os.X_OK):
            return c
        denied = denied or c
    if denied is not None:
        raise PermissionError(13, "Permission denied", os.fsdecode(denied))
    raise FileNotFoundError(2, "command not found", os.fsdecode(cmd))


def read_own_adj() -> int:
    with open("/proc/self/oom_score_adj", "rb") as f:
        return int(f.read())


def protect_self_directly() -> bool:
    """Write -1000 ourselves: works with CAP_SYS_RESOURCE, fails without."""
    try:
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.write(fd, b"-1000")
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def parse_size(text: str) -> int:
    """Bytes from 512M, 2G, 1.5G, 2GiB or a bare number (powers of 1024);
    ValueError otherwise. Written out, as `re` would cost the start-up."""
    t = text.strip().upper()
    for suffix in ("IB", "B"):
        if t.endswith(suffix) and t[: -len(suffix)][-1:] in ("K", "M", "G", "T"):
            t = t[: -len(suffix)]
            break
    unit = t[-1:] if t[-1:] in ("K", "M", "G", "T") else ""
    whole, dot, frac = t[: len(t) - len(unit)].partition(".")
    if not (whole.isascii() and whole.isdigit()) or (dot and not (frac.isascii() and frac.isdigit())):
        raise ValueError(f"--memory-max: {text!r} is not a size like 512M or 2G")
    if len(whole) > 19:
        raise ValueError(f"--memory-max: {text!r} is too large")
    size = int(float(whole + dot + frac) * SIZE_UNITS[unit])
    if size < MIN_MEMORY_MAX:
        raise ValueError(f"--memory-max: {text!r} is below the smallest budget, 1M")
    if size >= 1 << 60:
        raise ValueError(f"--memory-max: {text!r} is too large")
    return size


def request(report: bool = False, memory_max: int | None = None) -> bytes:
    """The protect request: one JSON line, built by hand (json imports re)."""
    line = b'{"op": "protect", "v": 1'
    if report:
        line += b', "report": true'
    if memory_max is not None:
        line += b', "memory_max": %d' % memory_max
    return line + b"}\n"


def ask_broker(path: str, timeout: float = 10.0, report: bool = False, memory_max: int | None = None) -> str:
    """Ask the daemon to protect this very process. Returns the reply line;
    raises Refused with a one-line reason."""
    import _socket

    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise Refused(f"the oomguard daemon is not running (no broker at {path})") from None
        except PermissionError:
            raise Refused(f"no permission to reach the broker at {path}") from None
        except OSError as e:
            raise Refused(f"cannot reach the broker at {path}: {e.strerror or e}") from None
        try:
            s.sendall(request(report, memory_max))
            reply = b""
            while not reply.endswith(b"\n") and len(reply) < 65536:
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        except OSError as e:
            raise Refused(f"the broker did not answer: {e.strerror or 'timed out'}") from None
    finally:
        s.close()
    text = reply.decode("utf-8", "replace").strip()
    if text.startswith('{"ok": true'):
        return text
    if not text:
        raise Refused("the broker closed the connection without an answer")
    import json  # only on the error path: json imports re

    try:
        error = str(json.loads(text).get("error") or "refused")
    except (ValueError, AttributeError):
        error = "the broker sent a malformed answer"
    raise Refused(error.splitlines()[0][:300])


def obtain_protection(env: dict[bytes, bytes], report: bool = False, memory_max: int | None = None) -> None:
    # A run report or a budget needs the daemon's run: ask it even when we could write ourselves.
    if report or memory_max is not None or not protect_self_directly():
        sock = env.get(b"OOMGUARD_SOCKET")
        ask_broker(os.fsdecode(sock) if sock else SOCKET, report=report, memory_max=memory_max)
    value = read_own_adj()
    if value != PROTECTED:
        raise Refused(f"protection did not take: oom_score_adj reads {value}, not {PROTECTED}")


def parse_args(argv: list[str]) -> tuple[str, list[str] | None, dict]:
    """("run", cmd, options) or ("help"|"version", None, options); raises
    ValueError on misuse. Options (report, memory_max) come before CMD:
    anything after CMD's name is CMD's own."""
    args = list(argv[1:])
    options: dict = {"report": False, "memory_max": None}
    given = False
    while args and args[0].startswith("-") and args[0] != "-":
        arg = args.pop(0)
        if arg == "--":
            break
        if arg in ("-h", "--help", "-V", "--version"):
            if given:
                raise ValueError(f"{arg} goes alone")
            return ("help" if arg in ("-h", "--help") else "version"), None, options
        if arg == "--report":
            options["report"] = True
        elif arg == "--memory-max" or arg.startswith("--memory-max="):
            if arg == "--memory-max":
                if not args:
                    raise ValueError("--memory-max needs a size, like 2G")
                value = args.pop(0)
            else:
                value = arg.partition("=")[2]
            options["memory_max"] = parse_size(value)
        else:
            raise ValueError(f"unknown option {arg!r} (put CMD after -- if it starts with -)")
        given = True
    if not args:
        raise ValueError("no command given")
    return "run", args, options


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    try:
        what, cmd, options = parse_args(argv)
    except ValueError as e:
        return _fail(EXIT_FAILED, f"{e}\nTry '{PROG} --help'.")
    if what == "help":
        print(USAGE)
        return 0
    if what == "version":
        print(f"{PROG} (oomguard) {VERSION}")
        return 0
    assert cmd is not None
    env = original_environ()
    cmd_b = [os.fsencode(a) for a in cmd]
    try:
        path = find_command(cmd_b[0], env)
    except FileNotFoundError:
        return _fail(EXIT_NOT_FOUND, f"{cmd[0]}: command not found")
    except PermissionError:
        return _fail(EXIT_CANNOT_RUN, f"{cmd[0]}: permission denied")
    try:
        obtain_protection(env, report=options["report"], memory_max=options["memory_max"])
    except Refused as e:
        return _fail(EXIT_FAILED, f"not protected, {cmd[0]} not run: {e}")
    except OSError as e:
        return _fail(EXIT_FAILED, f"not protected, {cmd[0]} not run: {e.strerror or e}")
    # Python ignores SIGPIPE and SIGXFSZ for itself; an exec keeps ignored
    # signals ignored, so give CMD the defaults a shell would.
    import _signal  # the C module: `signal` would import enum

    _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_DFL)
    try:
        sys.stdout.flush()
        os.execve(path, cmd_b, env)
    except FileNotFoundError:
        return _fail(EXIT_NOT_FOUND, f"{cmd[0]}: command not found")
    except OSError as e:
        return _fail(EXIT_CANNOT_RUN, f"{cmd[0]}: {e.strerror or e}")
    return EXIT_CANNOT_RUN  # not reached


if __name__ == "__main__":
    sys.exit(main())
