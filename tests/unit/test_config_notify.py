"""config.notify: [[notify.exec]] and [[notify.webhook]], each refusal naming its key."""

import pwd

import pytest

from oomguard.config import Config, ConfigError, parse
from oomguard.config.notify import ExecHook, NotifyConfig, WebhookHook

NOBODY = pwd.getpwnam("nobody")


def notify(**tables) -> NotifyConfig:
    return parse({"notify": tables}).notify


def test_no_hooks_by_default():
    assert parse({}).notify == NotifyConfig() == Config().notify


def test_an_exec_hook_runs_as_nobody_with_the_dataclass_defaults():
    (hook,) = notify(exec=[{"command": "/usr/sbin/sendmail -t ops@example.com"}]).exec
    assert hook.command == ("/usr/sbin/sendmail", "-t", "ops@example.com")
    assert (hook.uid, hook.gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
    assert (hook.kinds, hook.timeout, hook.per_minute) == (
        ExecHook.kinds, ExecHook.timeout, ExecHook.per_minute)  # fmt: skip


def test_an_exec_hook_takes_every_key():
    (hook,) = notify(exec=[{"command": ["/bin/logger", "-t", "oom"], "user": "nobody", "group": "root",
                            "kinds": ["oom_kill", "run_end"], "timeout": "3s", "per_minute": 5}]).exec
    assert hook.command == ("/bin/logger", "-t", "oom") and hook.gid == 0
    assert hook.kinds == frozenset({"oom_kill", "run_end"}) and hook.timeout == 3 and hook.per_minute == 5


def test_a_webhook_takes_every_key():
    (hook,) = notify(webhook=[{"url": "https://hooks.example.com/oom", "kinds": ["*"], "timeout": "2s",
                               "retries": 2, "backoff": "500ms", "queue_size": 10,
                               "headers": {"Authorization": "Bearer x"}}]).webhook
    assert hook == WebhookHook("https://hooks.example.com/oom", frozenset({"*"}), 2, 2, 0.5, 10,
                               (("Authorization", "Bearer x"),))


@pytest.mark.parametrize(
    "tables, key",
    [
        ({"exec": [{}]}, "notify.exec[0].command"),
        ({"exec": [{"command": "sendmail -t"}]}, "notify.exec[0].command"),  # not absolute
        ({"exec": [{"command": "/bin/true 'unclosed"}]}, "notify.exec[0].command"),
        ({"exec": [{"command": "/bin/true", "user": "root"}]}, "notify.exec[0].user"),
        ({"exec": [{"command": "/bin/true", "user": 0}]}, "notify.exec[0].user"),
        ({"exec": [{"command": "/bin/true", "user": "no-such-user-here"}]}, "notify.exec[0].user"),
        ({"exec": [{"command": "/bin/true", "group": "no-such-group-here"}]}, "notify.exec[0].group"),
        ({"exec": [{"command": "/bin/true", "kinds": ["oom-kill"]}]}, "notify.exec[0].kinds[0]"),
        ({"exec": [{"command": "/bin/true", "kinds": []}]}, "notify.exec[0].kinds"),
        ({"exec": [{"command": "/bin/true", "timeout": "0s"}]}, "notify.exec[0].timeout"),
        ({"exec": [{"command": "/bin/true", "per_minute": 0}]}, "notify.exec[0].per_minute"),
        ({"exec": [{"command": "/bin/true", "shell": True}]}, "notify.exec[0].shell"),
        ({"exec": {"command": "/bin/true"}}, "notify.exec"),
        ({"webhook": [{"url": "ftp://example.com/x"}]}, "notify.webhook[0].url"),
        ({"webhook": [{}]}, "notify.webhook[0].url"),
        ({"webhook": [{"url": "http://x/", "headers": {"X-A": "a\r\nX-B: b"}}]}, "notify.webhook[0].headers.X-A"),
        ({"webhook": [{"url": "http://x/", "retries": -1}]}, "notify.webhook[0].retries"),
        ({"webhook": [{"url": "http://x/", "queue_size": 0}]}, "notify.webhook[0].queue_size"),
        ({"mail": []}, "notify.mail"),
    ],
)
def test_a_bad_hook_is_refused_naming_the_key(tables, key):
    with pytest.raises(ConfigError) as e:
        notify(**tables)
    assert str(e.value).startswith(key + ":"), e.value
