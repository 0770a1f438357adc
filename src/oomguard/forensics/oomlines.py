"""The lines of a kernel OOM report: what each one looks like, and the
report being assembled from them (``OomParser`` in oomreport.py drives it).

Patterns that capture a comm take re.DOTALL: a comm may hold a newline, and
its record is then matched whole (see ``record_lines``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

RAW_LINES_MAX = 64  # bound on the lines an event keeps for forensics

INVOKED = re.compile(r"^(?P<comm>.*) invoked oom-killer: (?P<args>.*)$", re.DOTALL)
# "CPU: 4 PID: 63635 Comm: uwsgi Not tainted ..." (6.x adds "UID: 0 ")
CPU_PID = re.compile(
    r"^CPU: \d+ (?:UID: \d+ )?PID: (?P<pid>\d+) Comm: (?P<comm>.*?) (?:Not tainted|Tainted)",
    re.DOTALL,
)
SUMMARY = re.compile(
    r"^oom-kill:(?P<body>constraint=.*),task=(?P<task>.{0,64}),pid=(?P<pid>\d+),uid=(?P<uid>\d+)$",
    re.DOTALL,
)
TASK_IN = re.compile(r"^Task in (?P<task>.*) killed as a result of limit of (?P<oom>.*)$")
MEMCG_STATS = re.compile(r"^Memory cgroup stats for (?P<cg>/.*?):(?: |$)")
KILLED = re.compile(
    r"^(?:(?P<prefix>[^:]*(?:\([^)]*\))?): )?Killed process (?P<pid>\d+) \((?P<comm>.*)\)"
    r"(?P<tail>,? (?:UID \d+, )?total-vm:\d+kB.*)$",
    re.DOTALL,
)
KILLED_FIELD = re.compile(
    r"(total-vm|anon-rss|file-rss|shmem-rss|UID|pgtables|oom_score_adj)[: ](-?\d+)"
)
SELECT = re.compile(
    r"^(?P<prefix>.*): Kill process (?P<pid>\d+) \((?P<comm>.*)\) score -?\d+ or sacrifice child$",
    re.DOTALL,
)
NO_KILLABLE = "Out of memory and no killable processes"
GROUP_KILL = re.compile(
    r"^Tasks in (?P<cg>.*) are going to be killed due to memory\.oom\.group set$"
)
TABLE_HEAD = re.compile(r"^\[\s*pid\s*\]\s+(?P<cols>.*\bname)$")
TABLE_ROW = re.compile(r"^\[\s*(?P<pid>\d+)\]\s+(?P<rest>.*)$")

PREFIX_CONSTRAINT = {
    "Memory cgroup out of memory": "CONSTRAINT_MEMCG",
    "Out of memory": None,  # global, cpuset or mempolicy: the summary line says which
}


ONE_PRINTK = (INVOKED, CPU_PID, SUMMARY, KILLED, SELECT)


def record_lines(text: str) -> list[str]:
    """The lines of one record. Most records are one printk line; a few (the
    memcg stats) hold several. A record that reads whole as one of the lines
    that carry a comm stays whole, so a comm with a newline cannot split it."""
    text = text.removesuffix("\n")
    if "\n" in text and any(p.match(text) for p in ONE_PRINTK):
        return [text]
    return text.split("\n")


def opens_report(line: str) -> bool:
    return (
        line.startswith("oom-kill:")
        or TASK_IN.match(line) is not None
        or MEMCG_STATS.match(line) is not None
        or TABLE_HEAD.match(line) is not None
        or SELECT.match(line) is not None
    )


@dataclass
class PartialReport:
    seq: int
    ts_usec: int
    invoker_comm: str | None = None
    invoker_pid: int | None = None
    constraint: str | None = None
    oom_memcg: str | None = None
    task_memcg: str | None = None
    summary_pid: int | None = None
    summary_comm: str | None = None
    summary_uid: int | None = None
    summary_line: str | None = None
    group_cgroup: str | None = None  # set by "Tasks in X are going to be killed ... oom.group"
    killed: set[int] = field(default_factory=set)  # victims already reported
    table_cols: list[str] | None = None
    table: dict[int, tuple[int | None, int | None]] = field(
        default_factory=dict
    )  # pid -> (uid, adj)
    lines: int = 0
    raw: list[str] = field(default_factory=list)

    def keep(self, line: str) -> None:
        if len(self.raw) < RAW_LINES_MAX:
            self.raw.append(line)


def apply_summary(rep: PartialReport, line: str, comm: str | None = None) -> bool:
    """Read the ``oom-kill:`` summary line into ``rep``.

    The victim's comm is chosen by whoever started it and may contain
    ",task=", so without knowing it the line is split at the last possible
    place; once the "Killed process" line gave the real comm, it is split
    again exactly."""
    m = SUMMARY.match(line)
    if m is None:
        return False
    pid, uid = int(m.group("pid")), int(m.group("uid"))
    body, task = m.group("body"), m.group("task")
    if comm is not None and comm != task:
        suffix = f",task={comm},pid={pid},uid={uid}"
        if not line.endswith(suffix):
            return False
        body, task = line[len("oom-kill:") : -len(suffix)], comm
    rep.summary_pid, rep.summary_comm, rep.summary_uid = pid, task, uid
    rep.summary_line = line
    # constraint=C,nodemask=N,cpuset=S,mems_allowed=M,(oom_memcg=P|global_oom),task_memcg=T
    # Cgroup and cpuset names may hold commas, so cut at the known keys.
    constraint = body[len("constraint=") :].split(",", 1)[0]
    rep.constraint = constraint or rep.constraint
    cut = body.rfind(",task_memcg=")
    if cut >= 0:
        rep.task_memcg = body[cut + len(",task_memcg=") :]
        head = body[:cut]
    else:
        head = body
    at = head.find(",oom_memcg=")
    if at >= 0:
        rep.oom_memcg = head[at + len(",oom_memcg=") :]
    elif head.endswith(",global_oom"):
        rep.oom_memcg = None
    return True
