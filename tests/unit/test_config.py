import pytest

from oomguard import config
from oomguard.config import ConfigError


def write(tmp_path, text):
    p = tmp_path / "oomguard.toml"
    p.write_text(text)
    return p


def test_missing_default_file_means_defaults(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")
    cfg = config.load()
    assert cfg.protect.socket == "/run/oomguard/protect.sock"
    assert cfg.protect.allow_uids is None  # regular login users
    assert cfg.healer.grace == 180
    assert [(w.start.hour, w.end.hour, w.grace) for w in cfg.healer.windows] == [(23, 7, 900)]


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        config.load(tmp_path / "absent.toml")


def test_issue_config_shape_parses(tmp_path):
    p = write(tmp_path, '''
[healer]
grace = "3m"
timezone = "Europe/Amsterdam"
dry_run = false
[[healer.window]]
from = "23:00"
to = "07:00"
grace = "15m"
[[healer.check]]
name = "shop"
http = "http://127.0.0.1/"
interval = "5s"
timeout = "3s"
failures = 2
[[healer.service]]
name = "php-fpm"
restart = "systemctl restart 'php8.2-fpm'"
''')
    cfg = config.load(p)
    assert cfg.healer.grace == 180 and cfg.healer.timezone == "Europe/Amsterdam"
    assert cfg.healer.checks[0].kind == "http" and cfg.healer.checks[0].failures == 2
    assert cfg.healer.services[0].restart == ("systemctl", "restart", "php8.2-fpm")


@pytest.mark.parametrize(
    "text, key",
    [
        ("[protect]\nallow_users = ['no-such-user-xyz']", "protect.allow_users[0]: unknown user"),
        ("[protect]\nallow_groups = ['no-such-group-xyz']", "protect.allow_groups[0]: unknown group"),
        ("[protect]\nsocket = 'relative.sock'", "protect.socket: must be an absolute path"),
        ("[protect]\nbogus = 1", "protect.bogus: unknown key"),
        ("[healer]\ngrace = 'soon'", "healer.grace: expected a duration"),
        ("[healer]\ntimezone = 'Mars/Olympus'", "healer.timezone: unknown timezone"),
        (
            "[[healer.window]]\nfrom='22:00'\nto='02:00'\ngrace='1m'\n[[healer.window]]\nfrom='01:00'\nto='03:00'\ngrace='1m'",
            "windows [0] and [1] overlap",
        ),
        ("[[healer.window]]\nfrom='25:00'\nto='02:00'\ngrace='1m'", "healer.window[0].from"),
        ("[[healer.check]]\nname='x'\nhttp='ftp://x'", "healer.check[0].http"),
        ("[[healer.check]]\nname='x'\ntcp='a:1'\nhttp='http://a/'", "exactly one of"),
        ("[[policy.class]]\nname='db'\noom_score_adj=-1000\ncomm=['mysqld']", "a name alone can be forged"),
        ("[[policy.class]]\nname='x'\noom_score_adj=2000\ncomm=['a']", "policy.class[0].oom_score_adj"),
        ("[[policy.class]]\nname='x'\noom_score_adj=5\nparent=['nope']", "unknown class 'nope'"),
        ("[metrics]\nlisten = 'nowhere'", "metrics.listen"),
        ("[protect\n", "invalid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, text))
    assert key in str(e.value)
    assert str(tmp_path) in str(e.value)


def test_privileged_class_with_user_and_exe_is_accepted():
    cls = config.parse_policy_class(
        {"name": "db", "oom_score_adj": -1000, "user": ["root"], "exe": ["/usr/sbin/mariadbd"]}, "c"
    )
    assert cls.privileged and cls.user == (0,)


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("3m", 180), ("1h", 3600), ("250ms", 0.25), (7, 7)])
def test_durations(text, seconds):
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize("text, size", [("512M", 512 << 20), ("2G", 2 << 30), ("1GiB", 1 << 30), (4096, 4096)])
def test_sizes(text, size):
    assert config.parse_size(text) == size


def test_login_uid_range_reads_login_defs(tmp_path):
    p = tmp_path / "login.defs"
    p.write_text("# comment\nUID_MIN\t\t 2000\nUID_MAX 3000\n")
    assert config.login_uid_range(p) == (2000, 3000)
    assert config.login_uid_range(tmp_path / "absent") == (1000, 60000)
