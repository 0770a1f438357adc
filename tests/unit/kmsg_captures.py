"""Raw /dev/kmsg captures (tests/fixtures/kmsg, made by scripts/capture-kmsg-fixture) as records."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from oomguard.host import kmsg

KMSG = Path(__file__).resolve().parents[1] / "fixtures" / "kmsg"


def load_kmsg(path: Path, *, fresh: bool = False) -> list[kmsg.KmsgRecord]:
    """Every record of a capture, each of which must parse. With ``fresh``,
    as if printed just now (the last one at the kernel's present): the
    livelock gauge follows the kernel's clock, and a capture's own stamps
    are long past."""
    chunks = re.split(rb"\n(?! )", path.read_bytes())  # a record's dictionary lines start with a space
    records = [kmsg.parse_record(c + b"\n") for c in chunks if c]
    assert all(r is not None for r in records), f"{path.name}: unparsable record"
    recs: list[kmsg.KmsgRecord] = records  # type: ignore[assignment]
    if not fresh:
        return recs
    shift = kmsg.now_usec() - max(r.ts_usec for r in recs)
    return [replace(r, ts_usec=r.ts_usec + shift) for r in recs]
