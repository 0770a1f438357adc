"""Routes each event to the hooks that asked for its kind."""

from __future__ import annotations

from typing import Any

from oomguard.config.notify import NotifyConfig
from oomguard.notify.worker import HookWorker

EXEC_QUEUE = 100


class Notifier:
    """One worker per configured hook; ``notify`` never blocks."""

    def __init__(self, cfg: NotifyConfig):
        self.routes: list[tuple[frozenset[str], HookWorker]] = []
        for n, hook in enumerate(cfg.exec):
            from oomguard.notify.execer import ExecDelivery

            self.routes.append((hook.kinds, HookWorker(f"exec{n}", ExecDelivery(hook), EXEC_QUEUE)))
        for n, hook in enumerate(cfg.webhook):
            from oomguard.notify.webhook import WebhookDelivery  # urllib only when configured

            self.routes.append(
                (hook.kinds, HookWorker(f"webhook{n}", WebhookDelivery(hook), hook.queue_size))
            )

    def start(self) -> None:
        for _, worker in self.routes:
            worker.start()

    def notify(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        for kinds, worker in self.routes:
            if "*" in kinds or kind in kinds:
                worker.submit(event)

    def idle(self, timeout: float | None = None) -> bool:
        return all(worker.idle(timeout) for _, worker in self.routes)

    def stop(self, timeout: float = 5.0) -> None:
        for _, worker in self.routes:
            worker.stop(timeout)
