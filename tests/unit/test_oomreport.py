"""Tests for oomguard.forensics.oomreport: OOM report assembly from kmsg records."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from kmsg_captures import KMSG, load_kmsg

from oomguard.forensics import oomreport
from oomguard.forensics.oomreport import LivelockTracker, OomKill, OomLivelock, OomParser
from oomguard.host.kmsg import KmsgRecord, parse_record

FIXTURES = KMSG
PUBLISHED = FIXTURES / "published"
BOOT = 1_700_000_000.0

# ---------------------------------------------------------------- fixture loaders

_VMWARE = re.compile(r"^.* Guest: <(?P<lvl>\d)>\[\s*(?P<s>\d+)\.(?P<us>\d+)\] ?(?P<text>.*)$")
_SYSLOG = re.compile(
    r"^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ (?P<tag>[^:\[]+)(?:\[\d+\])?: (?P<text>.*)$"
)
_DMESG = re.compile(r"^\[\s*(?P<s>\d+)\.(?P<us>\d+)\] ?(?P<text>.*)$")
_DMESG_T = re.compile(r"^\[\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\] ?(?P<text>.*)$")
_USERSPACE = re.compile(r"^[\w.-]+\[\d+\]: ")  # "systemd[1]: ..." written to /dev/kmsg by a daemon


def load_published(path: Path) -> list[KmsgRecord]:
    """Records from a published kernel log (dmesg, dmesg -T, syslog or a
    hypervisor's console log). Lines that a daemon wrote get facility 3
    (LOG_DAEMON) as they would have in /dev/kmsg; kernel lines get 0."""
    out: list[KmsgRecord] = []
    ts = 0
    for n, line in enumerate(path.read_text().splitlines()):
        if line.startswith("#") or not line.strip():
            continue
        level, facility = 4, 0
        if m := _VMWARE.match(line):
            level, ts, text = int(m["lvl"]), int(m["s"]) * 1_000_000 + int(m["us"]), m["text"]
        elif m := _SYSLOG.match(line):
            text = m["text"]
            if m["tag"] != "kernel":
                facility = 3
            if d := _DMESG.match(text):
                ts, text = int(d["s"]) * 1_000_000 + int(d["us"]), d["text"]
            else:
                ts += 1000
        elif m := _DMESG.match(line):
            ts, text = int(m["s"]) * 1_000_000 + int(m["us"]), m["text"]
        elif m := _DMESG_T.match(line):
            ts, text = ts + 1000, m["text"]
        else:
            raise AssertionError(f"{path.name}:{n + 1}: unrecognised line {line!r}")
        if _USERSPACE.match(text):
            facility = 3
        out.append(
            KmsgRecord(
                seq=len(out) + 1, ts_usec=ts, level=level, facility=facility, text=text, cont=False
            )
        )
    return out


def parse_all(records: list[KmsgRecord], parser: OomParser | None = None) -> list[oomreport.OomEvent]:
    parser = parser or OomParser(boot_time=BOOT)
    events: list[oomreport.OomEvent] = []
    for rec in records:
        events.extend(parser.feed(rec))
    return events


def kills(events: list) -> list[OomKill]:
    return [e for e in events if isinstance(e, OomKill)]


def rec(seq: int, text: str, *, facility: int = 0, ts: int | None = None) -> KmsgRecord:
    return KmsgRecord(
        seq=seq,
        ts_usec=seq * 1000 if ts is None else ts,
        level=4,
        facility=facility,
        text=text,
        cont=False,
    )


# ---------------------------------------------------------------- published reports


def test_rhel7_3_10_kill_with_task_table_then_truncated_header() -> None:
    """3.10: no summary line, no shmem-rss; uid and oom_score_adj come from
    the task table; the next report never completes (the excerpt ends)."""
    parser = OomParser(boot_time=BOOT)
    events = parse_all(load_published(PUBLISHED / "rhel7-3.10-memcg-then-truncated.log"), parser)
    assert len(events) == 1
    k = events[0]
    assert isinstance(k, OomKill) and k.complete
    assert (k.victim_pid, k.victim_comm) == (28438, "java")
    assert (k.total_vm_kb, k.anon_rss_kb, k.file_rss_kb, k.shmem_rss_kb) == (
        20255636,
        466160,
        13684,
        None,
    )
    assert (k.victim_uid, k.oom_score_adj) == (0, -998)
    assert k.constraint == "CONSTRAINT_MEMCG"
    assert k.oom_memcg is not None and k.oom_memcg.startswith("/kubepods/pod95387fa4-")
    assert parser.pending
    (tail,) = parser.flush()
    assert isinstance(tail, OomKill) and not tail.complete
    assert (tail.invoker_comm, tail.invoker_pid, tail.victim_pid) == ("java", 14881, None)


def test_task_in_line_names_both_cgroups_and_a_cut_table_row_is_ignored() -> None:
    parser = OomParser(boot_time=BOOT)
    assert parse_all(load_published(PUBLISHED / "centos7-3.10-task-in-cut.log"), parser) == []
    (k,) = parser.flush()
    assert isinstance(k, OomKill) and not k.complete and k.victim_pid is None
    scope = "docker-b27201334a41cd0749d053b18378d7ea65617b8e26277197ea25c974da1a5a8a.scope"
    assert k.task_memcg is not None and k.task_memcg.endswith(scope)
    assert k.oom_memcg == k.task_memcg and k.constraint == "CONSTRAINT_MEMCG"
    assert k.raw[0].startswith("Task in /kubepods.slice/")


def test_4x_sacrifice_child_names_the_child_as_victim() -> None:
    events = parse_all(load_published(PUBLISHED / "ubuntu-4.x-memcg-sacrifice-child.log"))
    ks = kills(events)
    assert [k.victim_pid for k in ks] == [4254, 4255]  # not 4142, the parent "chosen"
    for k in ks:
        assert k.victim_comm == "python3" and k.complete
        assert (k.total_vm_kb, k.anon_rss_kb, k.file_rss_kb, k.shmem_rss_kb) == (
            11968,
            4288,
            3972,
            0,
        )
        assert k.constraint == "CONSTRAINT_MEMCG"
        assert k.invoker_comm is None
    assert len(events) == 2  # the vmalloc failure and oom_reaper lines are no events


def test_rate_limited_storm_yields_one_kill_per_line() -> None:
    ks = kills(parse_all(load_published(PUBLISHED / "ubuntu-5.x-memcg-storm.log")))
    assert [k.victim_pid for k in ks] == [15617, 15674, 15623, 15694]
    assert [k.file_rss_kb for k in ks] == [3428, 3424, 3420, 3440]
    assert all(k.constraint == "CONSTRAINT_MEMCG" and k.victim_uid is None for k in ks)
    assert len({k.seq for k in ks}) == 4


def test_centos7_uid_variant_and_interleaved_daemon_lines() -> None:
    events = parse_all(load_published(PUBLISHED / "centos7-3.10-syslog-interleaved.log"))
    (k,) = events
    assert isinstance(k, OomKill)
    assert (k.victim_pid, k.victim_comm, k.victim_uid) == (18177, "palo_be", 0)
    assert (k.total_vm_kb, k.anon_rss_kb, k.file_rss_kb, k.shmem_rss_kb) == (
        70347780,
        45563572,
        0,
        0,
    )


def test_photon_4_19_header_only_is_flushed_as_incomplete() -> None:
    records = load_published(PUBLISHED / "photon-4.19-header.log")
    assert records[0].level == 4 and records[1].level == 6
    parser = OomParser(boot_time=BOOT)
    assert parse_all(records, parser) == []
    (k,) = parser.flush()
    assert isinstance(k, OomKill) and not k.complete
    assert (k.invoker_comm, k.invoker_pid) == ("node", 2625)
    assert k.seq == records[0].seq and k.wall_time == pytest.approx(BOOT + records[0].ts_usec / 1e6)


def test_photon_4_19_report_cut_inside_the_kill_line() -> None:
    parser = OomParser(boot_time=BOOT)
    assert parse_all(load_published(PUBLISHED / "photon-4.19-tail-cut.log"), parser) == []
    (k,) = parser.flush()
    assert isinstance(k, OomKill) and not k.complete
    assert k.victim_pid is None
    assert k.constraint == "CONSTRAINT_MEMCG"
    assert k.oom_memcg == (
        "/kubepods/burstable/podfe3f7a38-b3f7-48aa-8997-a697ae3d0741/"
        "c7ebf4d756b284f6226cce820771afcf706a4e37afb77f052c61ece86d3b61f0"
    )


def test_ubuntu_5_4_kill_line_with_uid_pgtables_adj() -> None:
    parser = OomParser(boot_time=BOOT)
    events = parse_all(load_published(PUBLISHED / "ubuntu-5.4-memcg.log"), parser)
    (k,) = events
    assert isinstance(k, OomKill)
    assert (k.victim_pid, k.victim_comm, k.victim_uid, k.oom_score_adj) == (63214, "uwsgi", 0, 986)
    assert (k.total_vm_kb, k.anon_rss_kb, k.file_rss_kb, k.shmem_rss_kb) == (
        3149468,
        164992,
        52176,
        92,
    )
    assert k.ts_usec == 7063247407
    (nxt,) = parser.flush()
    assert (nxt.invoker_comm, nxt.invoker_pid) == ("uwsgi", 63635)


def test_global_oom_summary_and_kill() -> None:
    (k,) = parse_all(load_published(PUBLISHED / "global-5.x-docker.log"))
    assert isinstance(k, OomKill) and k.complete
    assert k.constraint == "CONSTRAINT_NONE"
    assert k.oom_memcg is None
    assert (
        k.task_memcg
        == "/system.slice/docker-88625dd7c1994cb919c74f13701150840fecf55beb388eb0c0839172c1c74bad.scope"
    )
    assert (k.victim_pid, k.victim_comm, k.victim_uid, k.oom_score_adj) == (13592, "uwsgi", 0, 0)
    assert k.total_vm_kb == 8441272
    assert len(k.raw) == 2 and k.raw[0].startswith("oom-kill:")


def test_invoker_comm_with_space_and_slash() -> None:
    parser = OomParser(boot_time=BOOT)
    parse_all(load_published(PUBLISHED / "sles-5.3-comm-with-space.log"), parser)
    (k,) = parser.flush()
    assert (k.invoker_comm, k.invoker_pid) == ("CPU 2/KVM", 10612)


def test_6x_summary_with_new_task_table_columns() -> None:
    parser = OomParser(boot_time=BOOT)
    assert parse_all(load_published(PUBLISHED / "linux-6.x-memcg-summary-cut.log"), parser) == []
    (k,) = parser.flush()
    assert isinstance(k, OomKill) and not k.complete
    assert (k.victim_pid, k.victim_comm, k.victim_uid, k.oom_score_adj) == (
        32550,
        "uvicorn",
        525287,
        992,
    )
    assert k.constraint == "CONSTRAINT_MEMCG"
    assert k.oom_memcg is not None and k.oom_memcg.endswith(
        "-pod17d1d0b1_bbeb_4252_a45c_c9f426d1cb34.slice"
    )
    assert k.task_memcg is not None and k.task_memcg.endswith(
        "/cri-containerd-799855c3e9e23ea07677c581b96f444dffb0932d7a907973bb08a8391803c559.scope"
    )


def test_6_18_global_kill_daemon_lines_and_new_cpu_line() -> None:
    parser = OomParser(boot_time=BOOT)
    events = parse_all(load_published(PUBLISHED / "yocto-6.18-global-interleaved.log"), parser)
    (k,) = events
    assert isinstance(k, OomKill)
    assert (k.victim_pid, k.victim_comm, k.victim_uid, k.oom_score_adj) == (
        235,
        "dbus-daemon",
        999,
        -900,
    )
    (nxt,) = parser.flush()
    assert (nxt.invoker_comm, nxt.invoker_pid) == ("systemd-udevd", 171)


def test_livelock_5_10_global() -> None:
    (ev,) = parse_all(load_published(PUBLISHED / "linux-5.10-livelock-global.log"))
    assert isinstance(ev, OomLivelock)
    assert ev.raw[-1] == "Out of memory and no killable processes..."


def test_livelock_4_18_inside_the_panic_line() -> None:
    parser = OomParser(boot_time=BOOT)
    (ev,) = parse_all(load_published(PUBLISHED / "linux-4.18-livelock-panic.log"), parser)
    assert isinstance(ev, OomLivelock)
    assert not parser.pending and parser.flush() == []


def test_every_published_fixture_is_documented() -> None:
    readme = (FIXTURES / "README.md").read_text()
    for path in PUBLISHED.glob("*.log"):
        assert path.name in readme, f"{path.name} has no source in tests/fixtures/kmsg/README.md"


# ---------------------------------------------------------------- captured reports


def captured() -> list[Path]:
    return sorted(FIXTURES.glob("*.kmsg"))


def test_captured_fixtures_exist() -> None:
    # At least the memcg kill and the livelock from the guest's kernel.
    names = {p.name for p in captured()}
    assert any("memcg-kill" in n for n in names), names
    assert any("livelock" in n for n in names), names


@pytest.mark.parametrize("path", captured(), ids=lambda p: p.name)
def test_captured_report(path: Path) -> None:
    expected = json.loads(Path(f"{path}.expected.json").read_text())
    records = load_kmsg(path)
    assert len(records) == expected["records"]
    parser = OomParser(boot_time=expected["boot_time"])
    events = parse_all(records, parser) + parser.flush()
    if expected["scenario"] == "livelock":
        locks = [e for e in events if isinstance(e, OomLivelock)]
        assert locks and not kills(events)
        for ev in locks:
            assert (ev.invoker_pid, ev.invoker_comm) == (
                expected["invoker_pid"],
                expected["invoker_comm"],
            )
            assert ev.oom_memcg == expected["oom_memcg"]
            assert ev.constraint == "CONSTRAINT_MEMCG"
        return
    ks = kills(events)
    by_pid = {k.victim_pid: k for k in ks}
    assert len(ks) == len(expected["kills"]), [(k.victim_pid, k.victim_comm) for k in ks]
    for want in expected["kills"]:
        got = by_pid[want["victim_pid"]]
        assert got.complete
        for key, value in want.items():
            assert getattr(got, key) == value, (key, getattr(got, key), value)
        assert got.anon_rss_kb is not None and got.total_vm_kb is not None
        assert got.wall_time == pytest.approx(expected["boot_time"] + got.ts_usec / 1e6)
    first = by_pid[expected["kills"][0]["victim_pid"]]
    assert first.invoker_comm is not None and first.invoker_pid is not None
    for pid in expected.get("not_killed", []):
        assert pid not in by_pid


def _memcg_kill_fixture() -> tuple[list[KmsgRecord], dict]:
    paths = [p for p in captured() if "memcg-kill" in p.name]
    if not paths:
        pytest.fail("no captured memcg-kill fixture in tests/fixtures/kmsg")
    return load_kmsg(paths[0]), json.loads(Path(f"{paths[0]}.expected.json").read_text())


# ---------------------------------------------------------------- robustness


def test_interleaved_lines_from_other_subsystems_change_nothing() -> None:
    records, expected = _memcg_kill_fixture()
    plain = kills(parse_all(records))
    noise = [
        "e1000e: eth0 NIC Link is Up 1000 Mbps Full Duplex",
        "CPU: 1 PID: 99 Comm: kworker/1:2 Not tainted 6.1.0 #1",  # another task's dump
        "[  pid  ]",
        'audit: type=1400 apparmor="DENIED"',
    ]
    mixed: list[KmsgRecord] = []
    for r in records:
        mixed.append(r)
        for text in noise:
            mixed.append(KmsgRecord(r.seq, r.ts_usec, 6, 0, text, False))
    assert [k.to_dict() for k in kills(parse_all(mixed))] == [k.to_dict() for k in plain]
    assert plain and plain[0].victim_pid == expected["kills"][0]["victim_pid"]


def test_truncated_report_yields_what_it_has_when_the_next_starts() -> None:
    records, expected = _memcg_kill_fixture()
    cut = [r for r in records if "Killed process" not in r.text]
    parser = OomParser(boot_time=BOOT)
    assert kills(parse_all(cut, parser)) == []
    follow = rec(
        records[-1].seq + 1,
        "python3 invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0",
    )
    (k,) = parser.feed(follow)
    assert not k.complete
    want = expected["kills"][0]
    assert (k.victim_pid, k.victim_comm, k.victim_uid) == (
        want["victim_pid"],
        want["victim_comm"],
        want["victim_uid"],
    )
    assert k.task_memcg == want["task_memcg"] and k.oom_score_adj == want["oom_score_adj"]
    assert parser.pending  # the new report is open


def test_open_report_is_bounded_by_lines_and_time() -> None:
    parser = OomParser(boot_time=BOOT, max_report_lines=5, max_report_usec=10_000_000)
    assert parser.feed(rec(1, "a invoked oom-killer: gfp_mask=0x0, order=0, oom_score_adj=0")) == []
    out = []
    for i in range(2, 9):
        out += parser.feed(rec(i, f"noise {i}"))
    assert len(out) == 1 and not out[0].complete and out[0].invoker_comm == "a"
    assert not parser.pending

    parser.feed(
        rec(20, "b invoked oom-killer: gfp_mask=0x0, order=0, oom_score_adj=0", ts=1_000_000)
    )
    assert parser.expire(now_usec=5_000_000) == []
    (k,) = parser.expire(now_usec=12_000_000)
    assert k.invoker_comm == "b" and not parser.pending
    # and a late record past the bound flushes it too
    parser.feed(
        rec(30, "c invoked oom-killer: gfp_mask=0x0, order=0, oom_score_adj=0", ts=1_000_000)
    )
    (k2,) = parser.feed(rec(31, "unrelated", ts=20_000_000))
    assert k2.invoker_comm == "c"


def test_resume_after_does_not_skip_an_open_report() -> None:
    parser = OomParser(boot_time=BOOT)
    parser.feed(rec(10, "x"))
    assert parser.resume_after(10) == 10
    parser.feed(rec(11, "a invoked oom-killer: gfp_mask=0x0, order=0, oom_score_adj=0"))
    parser.feed(rec(12, "CPU: 0 PID: 5 Comm: a Not tainted 6.1.0 #1"))
    assert parser.resume_after(12) == 10
    parser.feed(
        rec(
            13,
            "Memory cgroup out of memory: Killed process 5 (a) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB",
        )
    )
    assert parser.resume_after(13) == 13


def test_userspace_cannot_forge_a_kill() -> None:
    parser = OomParser(boot_time=BOOT)
    forged = [
        "evil invoked oom-killer: gfp_mask=0x0, order=0, oom_score_adj=0",
        "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/a,task_memcg=/a,task=sshd,pid=1,uid=0",
        "Memory cgroup out of memory: Killed process 1 (sshd) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB",
        "Out of memory and no killable processes...",
    ]
    events = []
    for i, text in enumerate(forged):
        events += parser.feed(rec(i + 1, text, facility=1))  # LOG_USER: what /dev/kmsg writers get
    assert events == [] and not parser.pending


def test_hostile_comm_cannot_shift_fields() -> None:
    """A victim may name itself ",task=x" or "a) total-vm:1kB" (15 bytes)."""
    parser = OomParser(boot_time=BOOT)
    comm = "a,task=b"
    parser.feed(rec(1, "a invoked oom-killer: gfp_mask=0x0, order=0, oom_score_adj=0"))
    parser.feed(
        rec(
            2,
            f"oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/app,task_memcg=/app/run-7,task={comm},pid=42,uid=1000",
        )
    )
    (k,) = parser.feed(
        rec(
            3,
            f"Memory cgroup out of memory: Killed process 42 ({comm}) total-vm:10kB, anon-rss:5kB, file-rss:1kB, shmem-rss:0kB, UID:1000 pgtables:4kB oom_score_adj:0",
        )
    )
    assert (k.victim_pid, k.victim_comm, k.task_memcg, k.oom_memcg) == (
        42,
        comm,
        "/app/run-7",
        "/app",
    )

    comm2 = "a) total-vm:1kB"
    (k2,) = parser.feed(
        rec(
            4,
            f"Out of memory: Killed process 43 ({comm2}) total-vm:99kB, anon-rss:7kB, file-rss:1kB, shmem-rss:2kB, UID:0 pgtables:4kB oom_score_adj:-5",
        )
    )
    assert (k2.victim_pid, k2.victim_comm, k2.total_vm_kb, k2.anon_rss_kb, k2.oom_score_adj) == (
        43,
        comm2,
        99,
        7,
        -5,
    )


def test_memory_oom_group_kills_are_each_reported() -> None:
    parser = OomParser(boot_time=BOOT)
    lines = [
        "hog invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=500",
        "CPU: 1 PID: 300 Comm: hog Not tainted 6.1.0-13-amd64 #1 Debian 6.1.55-1",
        "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/g,task_memcg=/g,task=hog,pid=300,uid=1000",
        "Memory cgroup out of memory: Killed process 300 (hog) total-vm:60000kB, anon-rss:49000kB, file-rss:100kB, shmem-rss:0kB, UID:1000 pgtables:140kB oom_score_adj:500",
        "Tasks in /g are going to be killed due to memory.oom.group set",
        "Memory cgroup out of memory: Killed process 301 (sleeper) total-vm:2000kB, anon-rss:100kB, file-rss:50kB, shmem-rss:0kB, UID:1000 pgtables:40kB oom_score_adj:0",
        # 6.1 names the first victim again in the group scan: still one kill
        "Memory cgroup out of memory: Killed process 300 (hog) total-vm:60000kB, anon-rss:49000kB, file-rss:100kB, shmem-rss:0kB, UID:1000 pgtables:140kB oom_score_adj:500",
    ]
    events = []
    for i, text in enumerate(lines):
        events += parser.feed(rec(i + 1, text))
    first, second = kills(events)
    assert (first.victim_pid, first.task_memcg, first.invoker_pid) == (300, "/g", 300)
    assert (second.victim_pid, second.victim_comm, second.oom_memcg, second.invoker_pid) == (
        301,
        "sleeper",
        "/g",
        300,
    )
    assert second.task_memcg is None  # the summary line described the first victim only
    assert second.seq == 6 and first.seq == 1


def test_parser_survives_garbage_records() -> None:
    parser = OomParser(boot_time=BOOT)
    rnd = random.Random(7)
    pieces = [
        "invoked oom-killer:",
        "Killed process",
        "(",
        ")",
        "total-vm:",
        "kB",
        ",",
        "oom-kill:",
        "constraint=",
        "task=",
        "pid=",
        "uid=",
        "-1",
        "99999999999999999999",
        "[ pid ]",
        "name",
        "\n",
        " ",
        "Tasks in ",
        "Out of memory and no killable processes",
        "CPU: 1 PID: 2 Comm: ",
        "Memory cgroup stats for /x:",
    ]
    for i in range(5000):
        text = "".join(rnd.choice(pieces) for _ in range(rnd.randrange(0, 12)))
        out = parser.feed(rec(i, text))
        assert isinstance(out, list)
    parser.flush()


def test_livelock_tracker_stores_one_per_cgroup_per_window() -> None:
    t = LivelockTracker(clear_after=30, store_every=60)
    a = OomLivelock(seq=1, ts_usec=1, wall_time=None, oom_memcg="/a")
    b = OomLivelock(seq=2, ts_usec=2, wall_time=None, oom_memcg="/b")
    assert not t.active(0)
    assert t.seen(a, 100) and t.seen(b, 100)
    assert not t.seen(a, 101) and not t.seen(a, 150)
    assert t.take_suppressed("/a") == 2 and t.take_suppressed("/a") == 0
    assert t.seen(a, 161)
    assert t.active(170) and not t.active(192)




def test_a_newline_in_the_victims_comm_keeps_its_kill_whole() -> None:
    """The kernel escapes the newline (\\x0a); unescaped, it must not split the
    record, or the kill would be lost to an incomplete oom_report."""
    parser = OomParser(boot_time=BOOT)
    parser.feed(rec(1, "php invoked oom-killer: gfp_mask=0x0, order=0, oom_score_adj=0"))
    summary = parse_record(
        b"6,2,100,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,"
        b"oom_memcg=/app,task_memcg=/app/run-7,task=a\\x0ab,pid=42,uid=1000\n"
    )
    killed = parse_record(
        b"3,3,101,-;Memory cgroup out of memory: Killed process 42 (a\\x0ab) total-vm:10kB, "
        b"anon-rss:5kB, file-rss:1kB, shmem-rss:0kB, UID:1000 pgtables:4kB oom_score_adj:0\n"
    )
    assert summary is not None and killed is not None and "\n" in killed.text
    assert parser.feed(summary) == []
    (k,) = parser.feed(killed)
    assert isinstance(k, OomKill)
    assert (k.victim_pid, k.victim_comm, k.victim_uid, k.task_memcg) == (42, "a\nb", 1000, "/app/run-7")


def test_a_comm_cannot_smuggle_a_second_kill_line() -> None:
    parser = OomParser(boot_time=BOOT)
    fake = "x\nOut of memory: Killed process 1 (systemd) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:4kB oom_score_adj:0"
    out = parser.feed(
        rec(
            1,
            f"Out of memory: Killed process 77 ({fake}) total-vm:9kB, anon-rss:8kB, file-rss:0kB, shmem-rss:0kB, UID:1000 pgtables:4kB oom_score_adj:0",
        )
    )
    kills = [e for e in out if isinstance(e, OomKill)]
    assert [(k.victim_pid, k.victim_uid) for k in kills] == [(77, 1000)]
    assert kills[0].victim_comm == fake
