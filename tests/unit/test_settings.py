"""prefs.settings and [protect] user_settings: what a user may choose."""

import json

import pytest

from oomguard.config import ConfigError, parse
from oomguard.config.broker import USER_SETTINGS
from oomguard.prefs.settings import KNOWN, SettingError, UserSettings


def test_the_config_knows_every_setting_there_is():
    assert set(USER_SETTINGS) == set(KNOWN)


def test_user_settings_in_the_config_are_checked_by_name():
    assert parse({"protect": {"user_settings": ["permissive"]}}).protect.user_settings == ("permissive",)
    with pytest.raises(ConfigError, match=r"^protect.user_settings\[1\]: unknown setting 'turbo'"):
        parse({"protect": {"user_settings": ["permissive", "turbo"]}})


def test_a_change_is_stored_per_user_and_survives_a_restart(tmp_path):
    path = tmp_path / "settings.json"
    s = UserSettings(path, frozenset({"permissive"}))
    assert s.of(1000)["permissive"]["value"] is False
    assert s.change(1000, "permissive", "on") == (False, True)
    assert s.value(1000, "permissive") is True and s.value(1001, "permissive") is False
    again = UserSettings(path, frozenset({"permissive"}))
    assert again.value(1000, "permissive") is True
    assert json.loads(path.read_text()) == {"1000": {"permissive": True}}
    # root withdraws the setting: it is no longer in force, and cannot be changed
    withdrawn = UserSettings(path, frozenset())
    assert withdrawn.value(1000, "permissive") is False and withdrawn.of(1000) == {}
    with pytest.raises(SettingError, match="not a setting you may change"):
        withdrawn.change(1000, "permissive", "off")
    assert json.loads(path.read_text()) == {"1000": {"permissive": True}}  # nothing changed


def test_a_bad_value_changes_nothing(tmp_path):
    s = UserSettings(tmp_path / "settings.json", frozenset({"permissive"}))
    with pytest.raises(SettingError, match="expected on or off"):
        s.change(1000, "permissive", "maybe")
    assert not (tmp_path / "settings.json").exists()
