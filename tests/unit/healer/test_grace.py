"""When the healer may act: grace windows across midnight, timezones and DST, and the restart back-off."""

from __future__ import annotations

from datetime import time as dtime

import pytest
from healer_rig import NIGHT, at, cfg, utc

from oomguard.config import (
    Window,
)
from oomguard.healer import grace


@pytest.mark.parametrize(
    "hh, mm, expected",
    [
        (12, 0, ("default", 180.0)),
        (22, 59, ("default", 180.0)),
        (23, 0, ("23:00-07:00", 900.0)),
        (0, 0, ("23:00-07:00", 900.0)),  # wrapped past midnight
        (3, 30, ("23:00-07:00", 900.0)),
        (6, 59, ("23:00-07:00", 900.0)),
        (7, 0, ("default", 180.0)),  # the end is exclusive
    ],
)
def test_window_table_wraps_midnight(hh, mm, expected):
    c = grace.choose_window(cfg(), at(hh, mm))
    assert (c.name, c.grace) == expected


def test_window_table_several_windows():
    lunch = Window(dtime(12, 0), dtime(13, 30), 60.0)
    c = cfg(windows=(NIGHT, lunch))
    assert grace.choose_window(c, at(12, 15)).grace == 60.0
    assert grace.choose_window(c, at(13, 30)).grace == 180.0
    assert grace.choose_window(c, at(23, 30)).grace == 900.0


def test_window_no_windows_means_default():
    assert grace.choose_window(cfg(windows=()), at(3, 0)).name == "default"


def test_window_timezone_is_applied():
    c = cfg(timezone="Asia/Tokyo")  # UTC+9, no DST
    assert grace.choose_window(c, at(14, 30)).name == "23:00-07:00"  # 23:30 in Tokyo
    assert grace.choose_window(c, at(22, 30)).name == "default"  # 07:30 in Tokyo


@pytest.mark.parametrize(
    "instant, expected",
    [
        # 2024-03-31, clocks go 02:00 CET -> 03:00 CEST
        (utc(2024, 3, 31, 4, 30), "23:00-07:00"),  # 06:30 CEST
        (utc(2024, 3, 31, 5, 30), "default"),  # 07:30 CEST (a fixed UTC+1 would say 06:30)
        (utc(2024, 3, 30, 21, 59), "default"),  # 22:59 CET the evening before
        (utc(2024, 3, 30, 22, 0), "23:00-07:00"),  # 23:00 CET
        # 2024-10-27, clocks go 03:00 CEST -> 02:00 CET
        (utc(2024, 10, 27, 5, 30), "23:00-07:00"),  # 06:30 CET (a fixed UTC+2 would say 07:30)
        (utc(2024, 10, 27, 6, 0), "default"),  # 07:00 CET
        (utc(2024, 10, 26, 20, 59), "default"),  # 22:59 CEST
        (utc(2024, 10, 26, 21, 0), "23:00-07:00"),  # 23:00 CEST
    ],
)
def test_window_on_dst_days_in_amsterdam(instant, expected):
    assert grace.choose_window(cfg(timezone="Europe/Amsterdam"), instant).name == expected


def test_window_in_the_repeated_and_the_skipped_hour():
    two_to_three = Window(dtime(2, 0), dtime(3, 0), 42.0)
    c = cfg(timezone="Europe/Amsterdam", windows=(two_to_three,))
    # 02:30 happens twice on 2024-10-27: both are in the window
    assert grace.choose_window(c, utc(2024, 10, 27, 0, 30)).grace == 42.0
    assert grace.choose_window(c, utc(2024, 10, 27, 1, 30)).grace == 42.0
    # 02:00-03:00 does not exist on 2024-03-31: 01:59 CET then 03:00 CEST
    assert grace.choose_window(c, utc(2024, 3, 31, 0, 59)).grace == 180.0
    assert grace.choose_window(c, utc(2024, 3, 31, 1, 0)).grace == 180.0


def test_backoff_doubles_up_to_the_cap():
    c = cfg(restart_backoff=5.0, restart_backoff_max=30.0, restart_tries=6)
    assert grace.backoff_delays(c) == [5.0, 10.0, 20.0, 30.0, 30.0, 30.0]
