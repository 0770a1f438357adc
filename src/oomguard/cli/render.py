"""What the CLI shows a human: tables and status, every user-controlled
string (comm, command line, user, cgroup, unit) through ``printable`` so no
escape sequence reaches the terminal raw. ``--json`` bypasses this module."""

from __future__ import annotations

import time

from oomguard.cli.terminal import printable

TYPE_CHECKING = False  # importing typing for it would cost every query 4 ms

if TYPE_CHECKING:
    from collections.abc import Sequence

    from oomguard.forensics.ranking import Ranking


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [["" if c is None else printable(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.0f} MiB"


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def render_status(d: dict) -> str:
    lines = []
    m = d.get("memory", {})
    lines.append(f"memory      {_mib(m.get('available'))} available of {_mib(m.get('total'))}")
    app = d.get("app") or {}
    if app.get("cgroup"):
        limit = _mib(app["max"]) if app.get("max") else "no limit"
        lines.append(f"app slice   {printable(app['cgroup'])}: {_mib(app.get('current'))} of {limit}, "
                     f"oom={app.get('oom', 0)} oom_kill={app.get('oom_kill', 0)}")  # fmt: skip
    else:
        lines.append("app slice   none (run `oomguard setup`)")
    psi = d.get("pressure")
    if psi:
        lines.append(f"pressure    memory some {psi['some_avg10']:.2f}% full {psi['full_avg10']:.2f}% (avg10)")
    if d.get("daemon") is None:
        lines.append(f"daemon      not reachable: {printable(d.get('daemon_error'))}")
        return "\n".join(lines)
    lines.append(f"daemon      pid {d['daemon']['pid']}, process events: {d['daemon']['process_events']}")
    prot = d.get("protected", [])
    lines.append(f"protected   {len(prot)} process(es) at -1000")
    for r in d.get("runs", []):
        lines.append(f"  run {r['id']:<4} {printable(r['user']):<10} pid {r['pid']:<7} {printable(r['command'][:60])}")
    h = d.get("healer") or {}
    checks = h.get("checks", {})
    for name, c in checks.items():
        state = "down" if c.get("down") else ("up" if c.get("healthy") else "failing")
        lines.append(f"check       {printable(name)}: {state} {printable(c.get('detail') or '')}".rstrip())
    healer_line = f"healer      {h.get('phase', '-')}"
    if h.get("window"):
        healer_line += f", window {h['window']} (grace {_dur(h.get('grace'))})"
        if h.get("down"):
            healer_line += f", down for {_dur(h.get('downtime'))}, acts in {_dur(h.get('time_left'))}"
    if h.get("dry_run"):
        healer_line += " [dry run]"
    lines.append(healer_line)
    if (h.get("livelock") or {}).get("active"):
        lines.append("livelock    only unkillable tasks left in the app cgroup: OOMs climb, nothing is killed")
    kills = d.get("last_oom_kills", [])
    lines.append(f"oom kills   {len(kills)} recent")
    for e in kills:
        k = e["data"]
        lines.append(f"  {ago(e['ts'])}  pid {k.get('victim_pid')} {printable(k.get('victim_comm'))} "
                     f"(uid {k.get('victim_uid')}) in {printable(k.get('oom_memcg') or '-')}")  # fmt: skip
    return "\n".join(lines)


def describe_event(e: dict) -> str:
    d = e["data"]
    kind = e["kind"]
    if kind == "oom_kill":
        runs = d.get("protected_runs") or []
        who = f"; protected runs alive: {', '.join(str(r['id']) + ' (' + r['user'] + ')' for r in runs)}" if runs else ""
        return (f"killed pid {d.get('victim_pid')} {d.get('victim_comm')} uid {d.get('victim_uid')} "
                f"anon {d.get('anon_rss_kb')} kB in {d.get('oom_memcg') or '-'}{who}")  # fmt: skip
    if kind in ("grant", "run_end"):
        tail = f" exit {d.get('exit_status')} ({d.get('end_reason')})" if kind == "run_end" else ""
        return f"run {d.get('id')} {d.get('user')} pid {d.get('pid')}: {str(d.get('command'))[:60]}{tail}"
    if kind == "refusal":
        return f"{d.get('user')} pid {d.get('pid')}: {d.get('message')}"
    if kind == "policy":
        return f"pid {d.get('pid')} {d.get('comm')}: {d.get('old')} -> {d.get('new')} ({d.get('class_name')})"
    text = d.get("message") or d.get("action") or ""
    return str(text)[:120]


def format_ranking(r: Ranking, limit: int | None = None) -> str:
    """``oomguard top``'s table, next victim first."""
    rows = r.entries[:limit] if limit else r.entries
    score_head = "POINTS" if r.cgroup else "SCORE"
    lines = [f"{'#':>5} {'PID':>7} {score_head:>10} {'ADJ':>5} {'RSS':>10} {'USER':<12} COMMAND"]
    for e in rows:
        score = e.points if r.cgroup else e.oom_score
        lines.append(
            f"{e.rank if e.rank is not None else 'never':>5} {e.pid:>7} "
            f"{score if score is not None else '-':>10} {e.adj:>5} {_human_kb(e.rss_kb):>10} "
            f"{printable(e.user[:12]):<12} {printable(e.comm)}"
        )
    return "\n".join(lines)


def _human_kb(kb: int) -> str:
    for unit in ("K", "M", "G"):
        if kb < 10240:
            return f"{kb}{unit}"
        kb //= 1024
    return f"{kb}T"


def render_run_report(report: dict) -> str:
    """`oomguard runs ID` for a terminal."""
    fmt_time, fmt_size, show = ago, _mib, printable
    run = report["run"]
    out = [
        f"run {run['id']}: {show(run['user'])}, pid {run['pid']}: {show(run['command'])}",
        f"started     {fmt_time(run['started'])}",
        f"{'running for' if report['running'] else 'ran for':<11} {_run_duration(report['duration'])}",
        f"peak memory {fmt_size(report['peak_memory'])}",
    ]
    if run.get("memory_max") is not None:
        out.append(f"budget      {fmt_size(run['memory_max'])} (oom-protect --memory-max)")
    if run.get("cgroup"):
        out.append(f"cgroup      {show(run['cgroup'])}")
    if run.get("scope_refused"):
        out.append(f"no scope    systemd refused it ({show(run['scope_refused'])}): a plain cgroup instead")
    if not report["running"]:
        out.append(f"ended       {fmt_time(run['ended'])} by {show(report['ended_by'])}, "
                   f"exit status {run.get('exit_status', '-')}")  # fmt: skip
    kills = report["oom_kills"]
    out.append(f"oom kills   {len(kills)} while it ran")
    for k in kills:
        who = (show(k["victim"]) if "victim" in k else
               f"pid {k.get('victim_pid')} {show(k.get('victim_comm'))} (uid {k.get('victim_uid')})")  # fmt: skip
        out.append(f"  {fmt_time(k['ts'])}  {who} in {show(k.get('oom_memcg') or '-')}")
    return "\n".join(out)


def _run_duration(seconds: float) -> str:
    s = int(seconds)
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m{s % 60:02d}s" if h else f"{m}m{s % 60:02d}s" if m else f"{s}s"
