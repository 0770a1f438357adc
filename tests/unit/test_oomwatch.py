"""Kernel OOM reports become attributed events."""

import threading
import time

from kmsg_captures import KMSG, load_kmsg

from oomguard.forensics import oomreport, oomwatch
from oomguard.forensics.events import EventStore
from oomguard.host import kmsg
from oomguard.runs.registry import RunRegistry
from oomguard.runs.run import Run


def run(rid, uid, started, ended=None):
    return Run(id=rid, uid=uid, user=f"u{uid}", pid=1000 + rid, starttime=rid, started=started,
               command=f"job {rid}", cgroup=None, ended=ended)


def watcher(tmp_path, *runs):
    reg = RunRegistry(tmp_path / "runs.json", "boot")
    for r in runs:
        reg.add(r)
    store = EventStore(":memory:", 3600, 1000)
    return oomwatch.OomWatcher(str(tmp_path / "no-kmsg"), store, reg), store


def kill(at):
    return oomreport.OomKill(
        seq=7, ts_usec=1, wall_time=at, invoker_comm="php", invoker_pid=5, constraint="CONSTRAINT_MEMCG",
        oom_memcg="/app", task_memcg="/app", victim_pid=42, victim_comm="php-fpm8.2", victim_uid=33,
        total_vm_kb=1, anon_rss_kb=2, file_rss_kb=3, shmem_rss_kb=0, oom_score_adj=200, raw=[],
    )


def test_a_kill_names_the_runs_alive_at_its_moment_not_at_reading(tmp_path):
    t = time.time() - 600
    w, store = watcher(
        tmp_path,
        run(1, 1000, t - 100, ended=t + 50),  # alive at the kill, ended before it was read
        run(2, 1001, t + 60),  # started after the kill
        run(3, 1002, t - 500, ended=t - 400),  # long gone
    )
    w.handle([kill(t)], seq=7)
    (event,) = store.query(kinds=["oom_kill"])
    assert [r["id"] for r in event["data"]["protected_runs"]] == [1]
    assert sorted(event["uids"]) == [33, 1000]  # the victim and the run's owner see it
    assert store.get_state("kmsg.seq") is not None  # position stored with the event


def test_privacy_follows_attribution(tmp_path):
    t = time.time() - 60
    w, store = watcher(tmp_path, run(1, 1000, t - 10))
    w.handle([kill(t)], seq=9)
    assert store.query(uid=1000, kinds=["oom_kill"])
    assert not store.query(uid=1001, kinds=["oom_kill"])


def test_a_report_without_a_victim_is_no_kill(tmp_path):
    from oomguard.forensics.metrics import Metrics

    reg = RunRegistry(tmp_path / "runs.json", "boot")
    store = EventStore(":memory:", 3600, 1000)
    m = Metrics()
    w = oomwatch.OomWatcher(str(tmp_path / "no-kmsg"), store, reg, m)
    cut = kill(time.time())
    cut.victim_pid = cut.victim_comm = cut.victim_uid = None
    w.handle([cut], seq=3)
    assert store.query(kinds=["oom_kill"]) == []
    assert [e["kind"] for e in store.query()] == ["oom_report"]
    assert b"oomguard_oom_kills_total{" not in m.render()


def test_ring_overruns_are_logged_once_per_interval(caplog):
    f = kmsg.KmsgFollower("/nonexistent", current_boot_id="b")
    with caplog.at_level("WARNING"):
        for _ in range(1000):
            f._report_lost(3, "ring buffer overrun")
    assert f.lost == 3000
    lines = [r for r in caplog.records if "records lost" in r.getMessage()]
    assert len(lines) == 1 and "3 kernel log records lost" in lines[0].getMessage()


# ------------------------------------------------ the kernel log position

def capture(name, fresh=True):
    return load_kmsg(KMSG / name, fresh=fresh)


def follow(w, recs):
    """As the follower hands them over: then the ring is drained."""
    for rec in recs:
        w.on_record(rec)
        w.follower.last_seq = rec.seq
    w.on_idle()


def test_the_position_moves_past_lines_that_are_no_event(tmp_path):
    w, store = watcher(tmp_path)
    follow(w, [kmsg.KmsgRecord(seq=500, ts_usec=kmsg.now_usec(), level=6, facility=0, text="eth0: link up", cont=False)])
    assert store.query() == []
    assert store.get_state("kmsg.seq") == "500"
    again = oomwatch.OomWatcher(str(tmp_path / "no-kmsg"), store, w.registry)
    assert again.follower.start_after_seq == 500  # a restart reads on from there


def test_a_restart_mid_livelock_does_not_store_its_repeats_again(tmp_path):
    """The kernel repeats a livelock report many times a second; one is
    stored, the rest counted. The position passes the repeats too, so the
    next daemon neither stores them as new nor reads them at all."""
    recs = capture("linux-6.1-livelock.kmsg")
    w, store = watcher(tmp_path)
    follow(w, recs)
    assert [e["kind"] for e in store.query()] == ["oom_livelock"]
    assert store.get_state("kmsg.seq") == str(max(r.seq for r in recs))
    again = oomwatch.OomWatcher(str(tmp_path / "no-kmsg"), store, w.registry)
    assert again.follower.start_after_seq == max(r.seq for r in recs)


def test_the_position_is_saved_at_stop_when_a_save_was_held_back(tmp_path):
    w, store = watcher(tmp_path)
    follow(w, [kmsg.KmsgRecord(seq=10, ts_usec=kmsg.now_usec(), level=6, facility=0, text="a", cont=False)])
    w.on_record(kmsg.KmsgRecord(seq=11, ts_usec=kmsg.now_usec(), level=6, facility=0, text="b", cont=False))
    w.follower.last_seq = 11
    assert w.on_idle() is True  # held back by SAVE_EVERY: look again soon
    assert store.get_state("kmsg.seq") == "10"
    w.run(threading.Event())  # the device is missing: run returns at once, and saves
    assert store.get_state("kmsg.seq") == "11"


def test_an_old_livelock_read_at_start_is_stored_but_raises_no_gauge(tmp_path):
    from oomguard.forensics.metrics import Metrics

    m = Metrics()
    store = EventStore(":memory:", 3600, 1000)
    w = oomwatch.OomWatcher(str(tmp_path / "no-kmsg"), store, RunRegistry(tmp_path / "runs.json", "boot"), m)
    follow(w, capture("linux-6.1-livelock.kmsg", fresh=False))  # printed at the capture's boot + 60 s
    assert [e["kind"] for e in store.query()] == ["oom_livelock"]
    assert b"oomguard_oom_livelock 0.0" in m.render()
    follow(w, capture("linux-6.1-livelock.kmsg"))  # one printed now does
    assert b"oomguard_oom_livelock 1.0" in m.render()
