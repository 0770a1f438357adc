"""The shipped Grafana dashboard's queries, with its variables filled in the
way Grafana fills them, so that Prometheus and promtool can run them
(used by test_fleet_contrib.py and tests/systemd/test_pipeline_systemd.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[2] / "contrib" / "grafana" / "oomguard-dashboard.json"
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def queries(dashboard: dict[str, Any], **values: str) -> list[tuple[str, str]]:
    """(panel title, expr) of every target, each $var / ${var} replaced by
    ``values`` (defaults: every instance, a 1m rate interval, a 3m grace)."""
    fill = {"instance": ".+", "__rate_interval": "1m", "__interval": "15s", "__range": "1h",
            "grace": "180"} | values  # fmt: skip

    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in fill:
            raise KeyError(f"no value for the dashboard variable ${name}")
        return fill[name]

    return [(p["title"], _VARIABLE.sub(one, t["expr"])) for p in dashboard["panels"] for t in p["targets"]]
