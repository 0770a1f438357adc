"""Commands the healer runs (restarts, command checks), never at -1000.

Children of the daemon must not inherit its oom_score_adj of -1000, or a
php-fpm restarted by the healer would itself be unkillable. Commands are
therefore exec'd through util-linux ``choom -n 0 -- argv...``: choom sets
its *own* oom_score_adj and then execs the command in the same process, so
the value is in place before the command runs its first instruction or
forks. No shell is involved, and no ``preexec_fn`` (Python code between fork
and exec can deadlock on locks held by the daemon's other threads).
Raising the value needs no privilege. If choom is missing, the same two
steps are done by a tiny ``python -I -S -c`` trampoline.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from oomguard.healer.probe_base import Cancel, kill_process_group


@dataclass(frozen=True)
class CommandResult:
    returncode: int | None  # None: could not start, or did not exit after SIGKILL
    timed_out: bool
    output: str  # the start of stdout+stderr, for logs and events

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


# Used only where choom is missing: set our own oom_score_adj, then exec.
_TRAMPOLINE = (
    "import os,sys\n"
    "with open('/proc/self/oom_score_adj','w') as f: f.write(sys.argv[1])\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def child_argv(argv: Sequence[str], oom_score_adj: int = 0) -> list[str]:
    """argv wrapped so that the command starts at ``oom_score_adj`` instead of
    inheriting the daemon's -1000 (see the module docstring)."""
    choom = shutil.which("choom")
    if choom:
        return [choom, "-n", str(int(oom_score_adj)), "--", *argv]
    return [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, str(int(oom_score_adj)), *argv]


def run_command(
    argv: Sequence[str],
    timeout: float,
    *,
    oom_score_adj: int = 0,
    kill_group: bool = True,
    cancel: Cancel | None = None,
    output_limit: int = 2048,
) -> CommandResult:
    """Run argv (no shell) at ``oom_score_adj``, in a session of its own.

    At the time-out the command is SIGKILLed: its whole process group if
    ``kill_group`` (checks: nothing they start may linger), else only the
    process itself (restart commands: the service they start may share the
    group and must survive). Output goes to a temp file, not a pipe, so a
    background child holding the pipe open cannot hang us."""
    if not argv:
        return CommandResult(None, False, "empty command")
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(
                child_argv(argv, oom_score_adj),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as e:
            return CommandResult(None, False, f"cannot start {argv[0]}: {e.strerror or e}")
        if cancel is not None and kill_group:
            cancel.add_process_group(proc.pid)
        timed_out = False
        try:
            rc: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            if kill_group:
                kill_process_group(proc.pid)
            else:
                proc.kill()
            try:
                rc = proc.wait(1.0)
            except subprocess.TimeoutExpired:
                rc = None  # stuck in D state; the Popen object reaps it later
        if kill_group and not timed_out:
            kill_process_group(proc.pid)  # leftovers a check put in the background
        out.seek(0)
        text = out.read(output_limit).decode("utf-8", "replace").strip()
    return CommandResult(rc, timed_out, text)
