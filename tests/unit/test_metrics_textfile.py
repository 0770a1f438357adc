"""[metrics] textfile: the exporter's metrics as a .prom file for node_exporter.

Real files, a real exporter on 127.0.0.1 port 0 and the daemon's own wiring
with a captured kernel OOM report: the file must parse, hold what the
exporter serves, be replaced whole at every write and follow each OOM kill.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import urllib.request
from pathlib import Path

import pytest
from kmsg_captures import KMSG, load_kmsg
from prometheus_client.parser import text_string_to_metric_families

from oomguard import config
from oomguard.config import ConfigError
from oomguard.daemon import Daemon
from oomguard.forensics.metrics import Metrics, TextfileWriter
from oomguard.telemetry.reasons import RefusalReason

DEADLINE = 30.0  # generous: the waits end on a condition, not on this


def families(text: str) -> dict[str, list[tuple[str, tuple, float]]]:
    """name -> its samples (name, sorted labels, value), NaN made comparable."""
    out = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = [
            (s.name, tuple(sorted(s.labels.items())), "nan" if s.value != s.value else s.value)
            for s in fam.samples
        ]
    return out


def busy_metrics(top_comms: int = 20) -> Metrics:
    m = Metrics(top_comms)
    m.oom_kill("php-fpm8.2", "/oomguard.slice/oomguard-app.slice/php8.2-fpm.service")
    m.oom_kill("hog", None)
    m.oom_livelock()
    m.set_livelock(True)
    m.grant()
    m.refusal(RefusalReason.NOT_ALLOWED)
    m.set_protected(3)
    m.set_downtime(12.5)
    m.set_healer_down(True)
    m.set_tick_seconds(0.01)
    m.set_oom_kill_rate(2.0)
    m.set_healer_livelock("/oomguard.app", False)
    m.healer_action("down")
    m.set_app_memory(100 << 20, 320 << 20)
    m.set_psi(12.0, 3.0)
    m.kmsg_lost(2)
    return m


def wait_for(predicate, what: str):
    done = threading.Event()
    for _ in range(int(DEADLINE / 0.05)):
        if value := predicate():
            return value
        done.wait(0.05)
    raise AssertionError(f"timed out after {DEADLINE} s waiting for {what}")


# --------------------------------------------------------------- the file


def test_the_textfile_parses_and_holds_every_family_the_exporter_serves(tmp_path):
    m = busy_metrics()
    path = tmp_path / "oomguard.prom"
    assert TextfileWriter(m.registry, str(path), 15.0).write()
    server = m.serve("127.0.0.1:0")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as resp:
            served = families(resp.read().decode())
    finally:
        server.close()
    written = families(path.read_text())
    assert len(served) >= 18 and set(written) == set(served), set(written) ^ set(served)
    assert written == served  # the same samples with the same values
    kills = dict((s[1], s[2]) for s in written["oomguard_oom_kills"])
    assert kills[(("cgroup", "/oomguard.slice/oomguard-app.slice"), ("comm", "php-fpm8.2"))] == 1
    assert kills[(("cgroup", "unknown"), ("comm", "hog"))] == 1


def test_the_textfile_is_world_readable_whatever_the_umask_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "oomguard.prom"
    old = os.umask(0o077)  # the daemon's unit has UMask=0077; node_exporter is another user
    try:
        assert TextfileWriter(busy_metrics().registry, str(path), 15.0).write()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["oomguard.prom"]


def test_each_write_replaces_the_file_whole_so_a_reader_never_sees_part_of_one(tmp_path):
    """A reader opening the path by name while ~100 KiB versions are written
    over and over reads, every time, exactly one of the versions written.
    The inode changes: the file is renamed over, never rewritten in place."""
    m = busy_metrics(top_comms=1000)
    for i in range(1000):
        m.oom_kill(f"worker-{i:04d}", f"/oomguard.app/run-{i}")
    writer = TextfileWriter(m.registry, str(tmp_path / "oomguard.prom"), 15.0)
    assert writer.write()
    versions = {Path(writer.path).read_text()}
    assert len(next(iter(versions))) > 50_000  # many pages: a torn write would show
    assert set(families(next(iter(versions)))) == set(families(m.render().decode()))

    stop = threading.Event()
    reads: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            with open(writer.path, encoding="utf-8") as f:
                reads.append(f.read())

    t = threading.Thread(target=reader)
    t.start()
    inodes = set()
    try:
        for n in range(60):
            m.oom_kill(f"worker-{n:04d}", f"/oomguard.app/run-{n}")  # a new version
            assert writer.write()
            versions.add(m.render().decode())  # nothing else changes m: what was written
            inodes.add(os.stat(writer.path).st_ino)
        wait_for(lambda: len(reads) >= 20, "the reader's 20th read")
    finally:
        stop.set()
        t.join(10)
    assert len(versions) == 61 and len(inodes) >= 2  # a freed inode number may come back
    torn = [r for r in reads if r not in versions]
    assert not torn, f"{len(torn)} of {len(reads)} reads saw no whole version: {torn[0][-200:]!r}"


def test_a_missing_directory_is_logged_once_not_created_and_the_write_resumes(tmp_path, caplog):
    where = tmp_path / "node-exporter"
    writer = TextfileWriter(busy_metrics().registry, str(where / "oomguard.prom"), 15.0)
    with caplog.at_level(logging.INFO, logger="oomguard.forensics.metrics"):
        assert writer.write() is False
        assert writer.write() is False
        assert not where.exists()  # node_exporter's package makes it, with its owner and mode
        where.mkdir()
        assert writer.write() is True
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "not written" in m]) == 1, messages
    assert f"metrics textfile {where / 'oomguard.prom'} written again" in messages
    assert families((where / "oomguard.prom").read_text())


def test_the_writer_rewrites_at_once_on_an_oom_kill_and_stops_when_told(tmp_path):
    m = Metrics()
    writer = TextfileWriter.attach(m, config.MetricsConfig(textfile=str(tmp_path / "o.prom"), textfile_interval=3600))
    stop = threading.Event()
    t = threading.Thread(target=writer.run, args=(stop,))
    t.start()
    try:
        wait_for(lambda: (tmp_path / "o.prom").exists(), "the first write")
        assert 'comm="hog"' not in (tmp_path / "o.prom").read_text()
        m.oom_kill("hog", "/oomguard.app")  # an hour before the next periodic write
        wait_for(lambda: 'comm="hog"' in (tmp_path / "o.prom").read_text(), "the kill in the file")
    finally:
        stop.set()
        writer.wake()
        t.join(DEADLINE)
    assert not t.is_alive()


def test_the_daemon_writes_the_textfile_with_the_port_off_and_follows_a_kernel_oom_kill(tmp_path):
    cfg_file = tmp_path / "oomguard.toml"
    prom = tmp_path / "textfile" / "oomguard.prom"
    prom.parent.mkdir()
    cfg_file.write_text(
        f"""
[daemon]
state_dir = "{tmp_path / 'state'}"
[protect]
socket = "{tmp_path / 'protect.sock'}"
[events]
db = "{tmp_path / 'events.db'}"
kmsg = "{tmp_path / 'no-kmsg'}"
[metrics]
listen = ""
textfile = "{prom}"
textfile_interval = "1h"
[policy]
enforce = false
"""
    )
    d = Daemon(config.load(cfg_file), str(cfg_file))
    assert d.textfile is not None and d.metrics.on_oom_kill == d.textfile.wake
    t = threading.Thread(target=d.textfile.run, args=(d.stop,))
    t.start()
    try:
        wait_for(prom.exists, "the first write")
        for rec in load_kmsg(KMSG / "linux-6.1-memcg-kill.kmsg"):
            d.oomwatch.on_record(rec)
        d.oomwatch.on_idle()
        kill = 'oomguard_oom_kills_total{cgroup="/oomguard-capture-198",comm="oomguard-hog"} 1.0'
        wait_for(lambda: kill in prom.read_text(), "the captured kill in the textfile")
    finally:
        d.stop.set()
        d.shutdown()  # wakes the writer
        t.join(DEADLINE)
    assert not t.is_alive()
    assert d.metrics_server is None


# --------------------------------------------------------------- the config


def parse(metrics: dict) -> config.MetricsConfig:
    return config.parse({"metrics": metrics}).metrics


def test_textfile_keys_parse_and_the_port_may_be_off():
    assert parse({}).textfile == "" and parse({}).textfile_interval == 15.0
    cfg = parse({"listen": "", "textfile": "/var/lib/prometheus/node-exporter/oomguard.prom",
                 "textfile_interval": "30s"})  # fmt: skip
    assert (cfg.listen, cfg.textfile, cfg.textfile_interval) == (
        "",
        "/var/lib/prometheus/node-exporter/oomguard.prom",
        30.0,
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("oomguard.prom", "is not an absolute path"),
        ("/var/lib/prometheus/node-exporter/oomguard.txt", "must be a NAME.prom file"),
        ("/var/lib/prometheus/node-exporter/.oomguard.prom", "must be a NAME.prom file"),
        ("/var/lib/prometheus/../../etc/x.prom", "has a '..' in it"),
        ("/var/lib/x\n.prom", "NUL or newline"),
        (42, "expected str"),
    ],
)
def test_a_bad_textfile_is_a_config_error_naming_the_key(value, message):
    with pytest.raises(ConfigError, match=r"^metrics\.textfile: .*" + re.escape(message)):
        parse({"textfile": value})


def test_a_directory_as_textfile_is_refused_with_the_file_to_name(tmp_path):
    d = tmp_path / "collector.prom"
    d.mkdir()
    with pytest.raises(ConfigError, match=rf"^metrics\.textfile: {d} is a directory; .*{d}/oomguard\.prom"):
        parse({"textfile": str(d)})


@pytest.mark.parametrize("value", ["0s", "500ms", "2h", "soon"])
def test_a_bad_textfile_interval_names_the_key(value):
    with pytest.raises(ConfigError, match=r"^metrics\.textfile_interval: "):
        parse({"textfile_interval": value})


def test_config_check_refuses_a_bad_textfile_in_a_file(tmp_path):
    f = tmp_path / "oomguard.toml"
    f.write_text('[metrics]\ntextfile = "relative.prom"\n')
    with pytest.raises(ConfigError, match=r"metrics\.textfile: 'relative\.prom' is not an absolute path"):
        config.load(f)
