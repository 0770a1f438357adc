"""The smaller schema modules: config.broker ([protect]), config.layout,
config.events and config.metrics. Each part's defaults are its dataclass."""

import pytest

from oomguard.config import (
    DEFAULT_SOCKET,
    Config,
    ConfigError,
    EventsConfig,
    LayoutConfig,
    MetricsConfig,
    ProtectConfig,
    parse,
    parse_listen,
)


def test_every_part_defaults_to_its_dataclass():
    cfg = parse({})
    assert cfg == Config()
    assert (cfg.protect, cfg.layout, cfg.events, cfg.metrics) == (
        ProtectConfig(), LayoutConfig(), EventsConfig(), MetricsConfig())  # fmt: skip
    assert cfg.protect.socket == DEFAULT_SOCKET and cfg.events.kmsg == "/dev/kmsg"


def test_protect_keys():
    p = parse({"protect": {"allow_users": ["root", 1000], "allow_groups": ["root"], "max_connections": 8,
                           "request_timeout": "500ms", "run_cgroups": False}}).protect  # fmt: skip
    assert p.allow_uids == frozenset({0, 1000}) and p.allow_gids == frozenset({0})
    assert (p.max_connections, p.max_connections_per_uid, p.request_timeout, p.run_cgroups) == (8, 4, 0.5, False)


@pytest.mark.parametrize(
    "table, message",
    [
        ({"protect": {"max_connections": 0}}, "protect.max_connections: must be between 1 and 4096, got 0"),
        ({"protect": {"max_connections_per_uid": True}}, "protect.max_connections_per_uid: expected int"),
        ({"layout": {"app_cgroup": "a/../b"}}, "layout.app_cgroup: must be a relative cgroup path"),
        ({"layout": {"app_slice": "app"}}, "layout.app_slice: must end in .slice"),
        ({"layout": {"system_reserve": "lots"}}, "layout.system_reserve: expected a size"),
        ({"events": {"max_rows": 5}}, "events.max_rows: must be between 100 and 100000000, got 5"),
        ({"events": {"db": "./events.db"}}, "events.db: must be an absolute path"),
        ({"metrics": {"top_comms": 0}}, "metrics.top_comms: must be between 1 and 1000"),
        ({"metrics": {"listen": "[::]:9464"}}, "metrics.listen: :: is not a loopback address"),
        ({"daemon": {"log_level": "loud"}}, "daemon.log_level: expected debug, info, warning or error"),
        ({"daemon": {"state_dir": "var/lib"}}, "daemon.state_dir: must be an absolute path"),
    ],
)
def test_bad_keys_are_named(table, message):
    with pytest.raises(ConfigError) as e:
        parse(table)
    assert message in str(e.value), str(e.value)


def test_layout_sizes_and_services():
    lay = parse({"layout": {"system_reserve": "1G", "daemon_memory_min": 1 << 20, "services": ["a.service"],
                            "app_cgroup": "/shop/app/"}}).layout  # fmt: skip
    assert (lay.system_reserve, lay.daemon_memory_min, lay.services, lay.app_cgroup) == (
        1 << 30, 1 << 20, ("a.service",), "shop/app")  # fmt: skip


def test_metrics_off_and_loopback_forms():
    assert parse({"metrics": {"listen": ""}}).metrics.listen == ""
    assert parse({"metrics": {"listen": "[::1]:9000"}}).metrics.listen == "[::1]:9000"
    assert parse_listen("localhost:9464") == ("localhost", 9464)
