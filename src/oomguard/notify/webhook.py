"""[[notify.webhook]]: POST an event as JSON, with retries and back-off.

Redirects are not followed (a POST must not turn into a GET elsewhere), a
4xx answer other than 429 is final, anything else is retried until the
hook's retries are spent or the daemon stops.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from typing import Any

from oomguard.config.notify import WebhookHook
from oomguard.notify.execer import HookError
from oomguard.notify.payload import body

BACKOFF_MAX = 300.0
REPLY_MAX = 65536


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class WebhookDelivery:
    def __init__(self, hook: WebhookHook):
        self.hook = hook
        self.attempts = 0
        self._opener = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))

    def __call__(self, event: dict[str, Any], stopping: threading.Event) -> None:
        data = body(event)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "oomguard",
            **dict(self.hook.headers),
        }
        delay = self.hook.backoff
        last: object = None
        for _ in range(self.hook.retries + 1):
            self.attempts += 1
            req = urllib.request.Request(self.hook.url, data=data, headers=headers, method="POST")
            try:
                with self._opener.open(req, timeout=self.hook.timeout) as resp:
                    resp.read(REPLY_MAX)
                return
            except urllib.error.HTTPError as e:
                if 400 <= e.code < 500 and e.code != 429:
                    raise HookError(f"{self.hook.url}: HTTP {e.code}, not retried") from None
                last = f"HTTP {e.code}"
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = getattr(e, "reason", None) or e
            if stopping.wait(delay):
                break
            delay = min(delay * 2, BACKOFF_MAX)
        raise HookError(f"{self.hook.url}: gave up after {self.attempts} attempts: {last}")
