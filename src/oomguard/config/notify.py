"""Settings of the event hooks ([[notify.exec]], [[notify.webhook]])."""

from __future__ import annotations

from dataclasses import dataclass, field

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
