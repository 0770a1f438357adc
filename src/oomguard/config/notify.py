"""Settings of the event hooks ([[notify.exec]], [[notify.webhook]])."""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass, field

from oomguard.config.table import Table, default_of
from oomguard.config.values import ConfigError, resolve_group, resolve_user, split_argv
from oomguard.host import users

# Kinds a hook may ask for; "*" means all of them.
NOTIFY_KINDS = (
    "oom_kill", "oom_livelock", "grant", "refusal", "run_end", "healer", "storm", "policy", "warning",
)  # fmt: skip


@dataclass(frozen=True)
class ExecHook:
    """A command run for each chosen event: no shell, as an unprivileged
    user, the event in OOMGUARD_* variables and as JSON on stdin."""

    command: tuple[str, ...]
    uid: int
    gid: int
    kinds: frozenset[str] = frozenset({"oom_kill", "healer", "storm", "warning"})
    timeout: float = 10.0
    per_minute: int = 30  # runs beyond this are dropped (and counted)


@dataclass(frozen=True)
class WebhookHook:
    """An HTTP(S) POST of each chosen event as JSON."""

    url: str
    kinds: frozenset[str] = frozenset({"oom_kill", "healer", "storm", "warning"})
    timeout: float = 5.0
    retries: int = 5
    backoff: float = 1.0  # doubles per retry
    queue_size: int = 1000
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class NotifyConfig:
    exec: tuple[ExecHook, ...] = field(default_factory=tuple)
    webhook: tuple[WebhookHook, ...] = field(default_factory=tuple)


def _kinds(t: Table, schema: type) -> frozenset[str]:
    if "kinds" not in t.data:
        return default_of(schema, "kinds")
    kinds = t.str_list("kinds")
    for i, kind in enumerate(kinds):
        if kind != "*" and kind not in NOTIFY_KINDS:
            raise ConfigError(
                f"{t.k('kinds')}[{i}]: unknown event kind {kind!r}; expected \"*\" or one of {', '.join(NOTIFY_KINDS)}"
            )
    if not kinds:
        raise ConfigError(f"{t.k('kinds')}: an empty list would never run the hook")
    return frozenset(kinds)


def _positive(t: Table, name: str, schema: type, hi: float) -> float:
    value = t.duration(name, default_of(schema, name))
    if not 0 < value <= hi:
        raise ConfigError(f"{t.k(name)}: must be more than 0 and at most {hi:g}s, got {value:g}s")
    return value


def parse_exec(t: Table) -> ExecHook:
    raw = t.get("command", None, (str, list))
    if raw is None:
        raise ConfigError(f"{t.k('command')}: required (the argv to run, e.g. [\"/usr/sbin/sendmail\", \"-t\"])")
    command = split_argv(raw, t.k("command")) if isinstance(raw, str) else t.str_list("command")
    if not command or not os.path.isabs(command[0]):
        raise ConfigError(f"{t.k('command')}: the program must be an absolute path (no shell, no PATH), got {raw!r}")
    user = t.get("user", "nobody", (str, int))
    uid = resolve_user(user, t.k("user"))
    if uid == 0:
        raise ConfigError(f"{t.k('user')}: hooks never run as root; name an unprivileged user")
    if "group" in t.data:
        gid = resolve_group(t.get("group", kind=(str, int)), t.k("group"))
    else:
        gid = users.primary_gid(user) if isinstance(user, str) and not user.isdigit() else None
        gid = uid if gid is None else gid
    hook = ExecHook(
        command=command,
        uid=uid,
        gid=gid,
        kinds=_kinds(t, ExecHook),
        timeout=_positive(t, "timeout", ExecHook, 3600),
        per_minute=t.bounded_int("per_minute", 1, 10000),
    )
    t.done()
    return hook


def parse_webhook(t: Table) -> WebhookHook:
    url = t.get("url", "", str)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{t.k('url')}: expected an http:// or https:// URL, got {url!r}")
    headers = t.get("headers", {}, dict)
    for name, value in headers.items():
        if not isinstance(value, str) or not name or any(c in name + value for c in "\r\n\0"):
            raise ConfigError(f"{t.k('headers')}.{name}: expected a one-line string, got {value!r}")
    hook = WebhookHook(
        url=url,
        kinds=_kinds(t, WebhookHook),
        timeout=_positive(t, "timeout", WebhookHook, 300),
        retries=t.bounded_int("retries", 0, 100),
        backoff=_positive(t, "backoff", WebhookHook, 300),
        queue_size=t.bounded_int("queue_size", 1, 100000),
        headers=tuple(sorted(headers.items())),
    )
    t.done()
    return hook


def parse_notify(t: Table) -> NotifyConfig:
    cfg = NotifyConfig(
        exec=tuple(parse_exec(item) for item in t.array("exec", ExecHook)),
        webhook=tuple(parse_webhook(item) for item in t.array("webhook", WebhookHook)),
    )
    t.done()
    return cfg
