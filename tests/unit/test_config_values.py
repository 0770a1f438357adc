"""config.values: scalars refused with their key named."""

from datetime import time as dtime

import pytest

from oomguard.config import ConfigError
from oomguard.config.values import (
    check_glob,
    glob_min_length,
    parse_clock,
    parse_duration,
    parse_size,
)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 10**400, "1" + "0" * 400 + "s"])
def test_non_finite_durations_are_refused(value):
    with pytest.raises(ConfigError, match="^healer.grace: "):
        parse_duration(value, "healer.grace")


def test_sizes_beyond_any_float_are_refused():
    with pytest.raises(ConfigError, match="^layout.system_reserve: "):
        parse_size("9" * 400 + "G", "layout.system_reserve")


def test_a_toml_time_literal_is_explained():
    with pytest.raises(ConfigError) as e:
        parse_clock(dtime(23, 0), "healer.window[0].from")
    assert str(e.value) == 'healer.window[0].from: write the time of day as a quoted string, "23:00"'
    assert "datetime" not in str(e.value)


@pytest.mark.parametrize("glob", ["[unclosed", "php-fpm[", "/usr/sbin/[!", "x[]"])
def test_unclosed_globs_are_refused(glob):
    with pytest.raises(ConfigError, match=r"^k: glob .* has a '\[' without its '\]'"):
        check_glob(glob, "k")


def test_empty_ranges_are_refused():
    with pytest.raises(ConfigError, match="empty range and can never match"):
        check_glob("[z-a]x", "k")


@pytest.mark.parametrize("glob", ["*", "php-fpm*", "[[]literal", "[]]x", "[!]]", "a?c", "/usr/sbin/php-fpm[0-9]*"])
def test_good_globs_pass(glob):
    assert check_glob(glob, "k") == glob


@pytest.mark.parametrize("glob, n", [("*", 0), ("abc", 3), ("a*b?", 3), ("[abc]x", 2), ("[]]*", 1)])
def test_glob_min_length(glob, n):
    assert glob_min_length(glob) == n
