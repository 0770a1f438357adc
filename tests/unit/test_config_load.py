"""config.load: the file itself, and the keys only the whole file can judge."""

import os
import threading

import pytest

from oomguard import config
from oomguard.config import MAX_BYTES, Config, ConfigError


def write(tmp_path, text):
    p = tmp_path / "oomguard.toml"
    p.write_text(text)
    return p


def test_a_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "oomguard.toml"
    os.mkfifo(fifo)
    result: list[BaseException] = []

    def attempt():
        try:
            config.load(fifo)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            result.append(e)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(30)  # a generous bound on a hang, not a speed claim
    assert not t.is_alive(), "config.load blocked on a FIFO"
    assert isinstance(result[0], ConfigError) and str(result[0]) == f"{fifo}: not a regular file"


def test_a_device_is_refused():
    with pytest.raises(ConfigError, match="^/dev/zero: not a regular file$"):
        config.load("/dev/zero")


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=f"^{tmp_path}: "):
        config.load(tmp_path)


def test_a_file_over_the_limit_is_refused(tmp_path):
    p = tmp_path / "big.toml"
    with open(p, "wb") as f:
        f.truncate(MAX_BYTES + 1)
    with pytest.raises(ConfigError, match=f"^{p}: {MAX_BYTES + 1} bytes; a config file is at most {MAX_BYTES}"):
        config.load(p)


def test_a_file_at_the_limit_is_read(tmp_path):
    p = tmp_path / "full.toml"
    line = b"# padding\n"
    p.write_bytes(b"[daemon]\nlog_level = 'debug'\n" + line * ((MAX_BYTES - 40) // len(line)))
    assert p.stat().st_size <= MAX_BYTES
    assert config.load(p).log_level == "debug"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[events]\ndb = 'events.db'", "events.db: must be an absolute path, got 'events.db'"),
        ("[daemon]\nstate_dir = 'state'", "daemon.state_dir: must be an absolute path, got 'state'"),
        ("[metrics]\nlisten = '0.0.0.0:9464'", "metrics.listen: 0.0.0.0 is not a loopback address"),
        ("[metrics]\nlisten = ':9464'", "metrics.listen: ':9464' has no host"),
        ("[metrics]\nlisten = '127.0.0.1:0'", "metrics.listen: port 0"),
        ("[protect]\nrequest_timeout = nan", "protect.request_timeout: must be a finite number"),
        ("[policy]\npoll_interval = inf", "policy.poll_interval: must be a finite number"),
        ("[events]\nmax_age = nan", "events.max_age: must be a finite number"),
        ("[healer]\ngrace = nan", "healer.grace: must be a finite number"),
        ("[[policy.class]]\nname='all'\noom_score_adj=-1000\nuser=['nobody']\nexe=['*']",
         "policy.class[0].exe[0]: '*' must be an absolute path"),
        ("[[policy.class]]\nname='t'\noom_score_adj=-1000\nuser=['nobody']\nexe=['/tmp/*']",
         "the directory /tmp is writable by other users"),
        ("[[policy.class]]\nname='x'\noom_score_adj=10\ncomm=['[unclosed']", "policy.class[0].comm[0]: glob"),
    ],
)
def test_what_the_daemon_would_refuse_is_refused_with_file_and_key(tmp_path, text, message):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert str(e.value).startswith(f"{p}: "), str(e.value)
    assert message in str(e.value)


def test_the_metrics_exporter_refuses_what_config_check_refuses():
    from oomguard.forensics import metrics

    assert metrics.parse_listen is config.parse_listen


def test_an_empty_file_is_the_defaults(tmp_path):
    cfg = config.load(write(tmp_path, ""))
    assert cfg == Config(source=str(tmp_path / "oomguard.toml"), files=(str(tmp_path / "oomguard.toml"),))
