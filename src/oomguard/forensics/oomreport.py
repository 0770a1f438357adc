"""The kernel's OOM reports, assembled from /dev/kmsg records.

* ``OomParser`` assembles the multi-line OOM report into one ``OomKill``
  (or an ``OomLivelock`` for "Out of memory and no killable processes").

The report format changed over the years; this parser reads all of these:

* 3.x/4.x (up to 4.18): no ``oom-kill:`` line; "Task in /a killed as a result
  of limit of /b"; "Kill process N (c) score S or sacrifice child" followed by
  an unprefixed "Killed process M (c) total-vm:...".
* 4.19 to 5.x: the ``oom-kill:constraint=...`` summary line; "Killed process"
  gains the "Memory cgroup out of memory: " / "Out of memory: " prefix.
* 5.x/6.x: "Killed process" ends in "UID:n pgtables:nkB oom_score_adj:n".

The kernel rate-limits the report header (10 per 5 s), so a bare "Killed
process" line without a header is normal in a storm and is a kill of its own.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from oomguard.forensics.oomlines import (
    CPU_PID,
    GROUP_KILL,
    INVOKED,
    KILLED,
    KILLED_FIELD,
    MEMCG_STATS,
    NO_KILLABLE,
    PREFIX_CONSTRAINT,
    RAW_LINES_MAX,
    SELECT,
    TABLE_HEAD,
    TABLE_ROW,
    TASK_IN,
    PartialReport,
    apply_summary,
    opens_report,
    record_lines,
)
from oomguard.host.kmsg import LOG_KERN, KmsgRecord

log = logging.getLogger(__name__)


@dataclass
class OomKill:
    """One process killed by the kernel's OOM killer.

    Fields the report did not carry (older kernels, a rate-limited header, a
    truncated report) are None. ``complete`` is False when the report never
    reached its "Killed process" line (then the victim comes from the
    ``oom-kill:`` summary, if it was seen)."""

    seq: int
    ts_usec: int
    wall_time: float | None
    invoker_comm: str | None = None
    invoker_pid: int | None = None
    constraint: str | None = None  # CONSTRAINT_NONE, CONSTRAINT_MEMCG, ...
    oom_memcg: str | None = None  # the cgroup whose limit was hit
    task_memcg: str | None = None  # the victim's cgroup
    victim_pid: int | None = None
    victim_comm: str | None = None
    victim_uid: int | None = None
    total_vm_kb: int | None = None
    anon_rss_kb: int | None = None
    file_rss_kb: int | None = None
    shmem_rss_kb: int | None = None
    oom_score_adj: int | None = None
    raw: list[str] = field(default_factory=list)
    complete: bool = True

    kind = "oom_kill"  # the event store's kind

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class OomLivelock:
    """The OOM killer ran and found nothing it may kill ("Out of memory and no
    killable processes..."): every candidate has oom_score_adj -1000 or is
    exempt. Outside a cgroup the kernel panics right after; inside one the
    allocating tasks loop and the cgroup is stuck until memory is freed."""

    seq: int
    ts_usec: int
    wall_time: float | None
    invoker_comm: str | None = None
    invoker_pid: int | None = None
    constraint: str | None = None
    oom_memcg: str | None = None
    raw: list[str] = field(default_factory=list)

    kind = "oom_livelock"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


OomEvent = OomKill | OomLivelock


class OomParser:
    """Assembles OOM reports from kernel records; ``feed`` returns the events
    completed by a record. Never raises on malformed input: such lines are
    ignored (and logged at debug level).

    ``boot_time`` (wall-clock seconds at boot) turns the kernel's timestamps
    into wall time; by default it is read from /proc/stat once."""

    def __init__(
        self,
        boot_time: float | None = None,
        *,
        max_report_lines: int = 50_000,
        max_report_usec: int = 60_000_000,
    ):
        if boot_time is None:
            # wall clock minus the clock printk stamps with: btime in
            # /proc/stat is whole seconds, enough to misorder events
            boot_time = time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)
        self.boot_time = boot_time
        self.max_report_lines = max_report_lines
        self.max_report_usec = max_report_usec
        self._open: PartialReport | None = None
        # Context for oom.group kills that follow the first victim's line.
        self._group: PartialReport | None = None

    # -------------------------------------------------------------- public

    def feed(self, rec: KmsgRecord) -> list[OomEvent]:
        if rec.facility != LOG_KERN:
            return []  # userspace writes to /dev/kmsg; never an OOM report
        out: list[OomEvent] = []
        try:
            for line in record_lines(rec.text):
                self._line(rec, line, out)
        except Exception:  # noqa: BLE001 - a parser bug must not stop the follower
            log.exception("kmsg: cannot parse record %d; skipped", rec.seq)
            self._open = None
        return out

    def flush(self) -> list[OomEvent]:
        """Emit a report that is still open, marked incomplete."""
        out: list[OomEvent] = []
        if self._open is not None:
            out.append(self._incomplete(self._open))
            self._open = None
        self._group = None
        return out

    def expire(self, now_usec: int) -> list[OomEvent]:
        """Flush an open report older than the bound; call when the ring is idle."""
        if self._open is not None and now_usec - self._open.ts_usec > self.max_report_usec:
            return self.flush()
        return []

    @property
    def pending(self) -> bool:
        return self._open is not None

    def resume_after(self, seq: int) -> int:
        """The sequence number to persist after feeding record ``seq``: a
        restart that skips records up to it loses nothing, because a report
        still open (its header read, its kill line not yet) is read again
        from its first record."""
        return min(seq, self._open.seq - 1) if self._open is not None else seq

    # -------------------------------------------------------------- lines

    def _wall(self, ts_usec: int) -> float | None:
        return None if self.boot_time is None else self.boot_time + ts_usec / 1e6

    def _line(self, rec: KmsgRecord, line: str, out: list[OomEvent]) -> None:
        rep = self._open
        if rep is not None:
            rep.lines += 1
            if (
                rep.lines > self.max_report_lines
                or rec.ts_usec - rep.ts_usec > self.max_report_usec
            ):
                out.append(self._incomplete(rep))
                rep = self._open = None

        if m := INVOKED.match(line):
            if rep is not None:
                out.append(self._incomplete(rep))
            rep = self._open = PartialReport(
                seq=rec.seq, ts_usec=rec.ts_usec, invoker_comm=m.group("comm")
            )
            rep.keep(line)
            self._group = None
            return

        if (m := KILLED.match(line)) is not None:
            if (kill := self._killed(rec, line, m)) is not None:
                out.append(kill)
            return

        if NO_KILLABLE in line:  # 4.18 and older: part of the panic line
            out.append(self._livelock(rec, line))
            return

        if (m := GROUP_KILL.match(line)) is not None:
            # The first victim was reported; every task in this cgroup follows
            # as its own "Killed process" line with the same cause.
            if self._group is not None:
                self._group.group_cgroup = m.group("cg")
            return

        if rep is None:
            if not opens_report(line):
                return
            # The middle of a report whose header we never saw (it was before
            # the oldest record in the ring, or lost to an overrun).
            rep = self._open = PartialReport(seq=rec.seq, ts_usec=rec.ts_usec)

        if rep.invoker_pid is None and (m := CPU_PID.match(line)):
            if m.group("comm") == rep.invoker_comm:
                rep.invoker_pid = int(m.group("pid"))
                rep.keep(line)
        elif line.startswith("oom-kill:"):
            if apply_summary(rep, line):
                rep.keep(line)
        elif m := TASK_IN.match(line):
            rep.task_memcg = m.group("task")
            rep.oom_memcg = m.group("oom")
            rep.constraint = rep.constraint or "CONSTRAINT_MEMCG"
            rep.keep(line)
        elif rep.oom_memcg is None and (m := MEMCG_STATS.match(line)):
            rep.oom_memcg = m.group("cg")
            rep.constraint = rep.constraint or "CONSTRAINT_MEMCG"
        elif m := TABLE_HEAD.match(line):
            rep.table_cols = m.group("cols").split()
        elif rep.table_cols and (m := TABLE_ROW.match(line)):
            self._table_row(rep, int(m.group("pid")), m.group("rest"))
        elif m := SELECT.match(line):
            # 4.x names the chosen task here; the victim may be its child.
            if rep.constraint is None:
                rep.constraint = PREFIX_CONSTRAINT.get(m.group("prefix").split(" (")[0])
            rep.keep(line)

    def _table_row(self, rep: PartialReport, pid: int, rest: str) -> None:
        cols = rep.table_cols or []
        # Every column but the last ("name", which may hold spaces) is a number.
        parts = rest.split(None, len(cols) - 1)
        if len(parts) < len(cols):
            return
        values = dict(zip(cols[:-1], parts[:-1], strict=True))
        try:
            uid = int(values["uid"]) if "uid" in values else None
            adj = int(values["oom_score_adj"]) if "oom_score_adj" in values else None
        except ValueError:
            return
        rep.table[pid] = (uid, adj)

    # -------------------------------------------------------------- events

    def _killed(self, rec: KmsgRecord, line: str, m: re.Match[str]) -> OomKill | None:
        pid = int(m.group("pid"))
        comm = m.group("comm")
        nums: dict[str, int] = {}
        for k, v in KILLED_FIELD.findall(m.group("tail")):
            nums.setdefault(k, int(v))
        prefix = m.group("prefix")

        rep, group = self._open, False
        if rep is None and self._group is not None and self._group.group_cgroup is not None:
            # Another member of a memory.oom.group cgroup: same cause, own line.
            # 6.1 reports the first victim a second time in that scan (and
            # counts it twice in memory.events); it is one kill.
            rep, group = self._group, True
            if pid in rep.killed:
                return None
        if rep is None:
            # A kill whose report header the kernel rate-limited away.
            rep = PartialReport(seq=rec.seq, ts_usec=rec.ts_usec)
        if rep.summary_line is not None and rep.summary_comm != comm and rep.summary_pid == pid:
            apply_summary(rep, rep.summary_line, comm)
        same_victim = rep.summary_pid == pid
        seq, ts = (rec.seq, rec.ts_usec) if group else (rep.seq, rep.ts_usec)
        kill = OomKill(
            seq=seq,
            ts_usec=ts,
            wall_time=self._wall(ts),
            invoker_comm=rep.invoker_comm,
            invoker_pid=rep.invoker_pid,
            constraint=rep.constraint,
            oom_memcg=rep.oom_memcg,
            # The summary and "Task in" lines describe the first victim only.
            task_memcg=rep.task_memcg
            if not group and (same_victim or rep.summary_pid is None)
            else None,
            victim_pid=pid,
            victim_comm=comm,
            victim_uid=nums.get("UID"),
            total_vm_kb=nums.get("total-vm"),
            anon_rss_kb=nums.get("anon-rss"),
            file_rss_kb=nums.get("file-rss"),
            shmem_rss_kb=nums.get("shmem-rss"),
            oom_score_adj=nums.get("oom_score_adj"),
            raw=[*rep.raw[: RAW_LINES_MAX - 1], line],
        )
        if kill.constraint is None and prefix is not None:
            kill.constraint = PREFIX_CONSTRAINT.get(prefix.split(" (")[0])
        if kill.victim_uid is None and same_victim:
            kill.victim_uid = rep.summary_uid
        if pid in rep.table:
            uid, adj = rep.table[pid]
            kill.victim_uid = kill.victim_uid if kill.victim_uid is not None else uid
            kill.oom_score_adj = kill.oom_score_adj if kill.oom_score_adj is not None else adj
        rep.killed.add(pid)
        if not group:
            self._open = None
            self._group = rep
        return kill

    def _incomplete(self, rep: PartialReport) -> OomKill:
        """What a report that never reached its kill line tells."""
        uid = rep.summary_uid
        adj = None
        if rep.summary_pid is not None and rep.summary_pid in rep.table:
            t_uid, adj = rep.table[rep.summary_pid]
            uid = uid if uid is not None else t_uid
        return OomKill(
            seq=rep.seq,
            ts_usec=rep.ts_usec,
            wall_time=self._wall(rep.ts_usec),
            invoker_comm=rep.invoker_comm,
            invoker_pid=rep.invoker_pid,
            constraint=rep.constraint,
            oom_memcg=rep.oom_memcg,
            task_memcg=rep.task_memcg,
            victim_pid=rep.summary_pid,
            victim_comm=rep.summary_comm,
            victim_uid=uid,
            oom_score_adj=adj,
            raw=list(rep.raw),
            complete=False,
        )

    def _livelock(self, rec: KmsgRecord, line: str) -> OomLivelock:
        rep = self._open or PartialReport(seq=rec.seq, ts_usec=rec.ts_usec)
        self._open = None
        self._group = None
        return OomLivelock(
            seq=rep.seq,
            ts_usec=rep.ts_usec,
            wall_time=self._wall(rep.ts_usec),
            invoker_comm=rep.invoker_comm,
            invoker_pid=rep.invoker_pid,
            constraint=rep.constraint or ("CONSTRAINT_MEMCG" if rep.oom_memcg else None),
            oom_memcg=rep.oom_memcg,
            raw=[*rep.raw[: RAW_LINES_MAX - 1], line],
        )


class LivelockTracker:
    """Makes the livelock messages usable: inside a cgroup the kernel retries
    the failing allocation and prints a full report plus "no killable
    processes" on every try, many times a second. ``seen`` says which of them
    to store (the first per cgroup in ``store_every`` seconds) and counts the
    rest; ``active`` is True while one was seen in the last ``clear_after``
    seconds (the kernel prints nothing when a livelock ends). Times are the
    caller's monotonic clock."""

    def __init__(self, clear_after: float = 30.0, store_every: float = 60.0):
        self.clear_after = clear_after
        self.store_every = store_every
        self._last_seen: float | None = None
        self._stored: dict[str | None, float] = {}
        self.suppressed: dict[str | None, int] = {}

    def seen(self, event: OomLivelock, now: float) -> bool:
        self._last_seen = now
        key = event.oom_memcg
        last = self._stored.get(key)
        if last is not None and now - last < self.store_every:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            return False
        self._stored[key] = now
        return True

    def take_suppressed(self, memcg: str | None) -> int:
        """How many were suppressed for this cgroup since the last stored one."""
        return self.suppressed.pop(memcg, 0)

    def active(self, now: float) -> bool:
        return self._last_seen is not None and now - self._last_seen < self.clear_after
