"""config.healer: windows, checks, services and the healer's numbers."""

import pytest

from oomguard.config import ConfigError, HealerConfig, parse


def healer(text_or_table):
    return parse({"healer": text_or_table}).healer


def refused(table, message):
    with pytest.raises(ConfigError) as e:
        healer(table)
    assert message in str(e.value), str(e.value)


@pytest.mark.parametrize("key", ["grace", "term_timeout", "restart_backoff", "restart_backoff_max"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_healer_durations_are_refused(key, value):
    refused({key: value}, f"healer.{key}: must be a finite number")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 10**400])
def test_non_finite_storm_rate_is_refused(value):
    refused({"storm_kills_per_second": value}, "healer.storm_kills_per_second: ")


@pytest.mark.parametrize("key", ["interval", "timeout"])
def test_non_finite_check_durations_are_refused(key):
    refused({"check": [{"name": "shop", "tcp": "127.0.0.1:80", key: float("nan")}]},
            f"healer.check[0].{key}: must be a finite number")


def test_a_window_grace_of_nan_is_refused():
    refused({"window": [{"from": "23:00", "to": "07:00", "grace": float("nan")}]},
            "healer.window[0].grace: must be a finite number")


def test_a_window_without_grace_says_so():
    with pytest.raises(ConfigError) as e:
        healer({"window": [{"from": "23:00", "to": "07:00"}]})
    assert str(e.value) == 'healer.window[0].grace: every window needs its grace, a duration like "15m"'


def test_a_toml_time_literal_in_a_window_is_explained():
    import tomllib

    data = tomllib.loads("[[healer.window]]\nfrom = 23:00:00\nto = \"07:00\"\ngrace = \"15m\"\n")
    with pytest.raises(ConfigError) as e:
        parse(data)
    assert str(e.value) == 'healer.window[0].from: write the time of day as a quoted string, "23:00"'


def test_defaults_are_the_dataclass():
    assert healer({}) == HealerConfig()
    c = healer({"check": [{"name": "shop", "http": "http://127.0.0.1/"}]}).checks[0]
    assert (c.interval, c.timeout, c.failures, c.expect_status) == (5.0, 3.0, 2, 200)


def test_check_status_and_service_restart():
    h = healer({"check": [{"name": "db", "mysql": "/run/mysqld/mysqld.sock", "status": 204}],
                "service": [{"name": "php8.2-fpm"}]})
    assert h.checks[0].expect_status == 204 and h.checks[0].kind == "mysql"
    assert h.services[0].restart == ("systemctl", "restart", "php8.2-fpm")
