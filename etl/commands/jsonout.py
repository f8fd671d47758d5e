"""`--json` output: every document carries its times as ISO 8601 in UTC (`2026-11-24T05:14:07Z`).

The warehouse stores UTC; SQLite hands datetimes back without a zone, so every datetime is
made aware (UTC) before it is written: a program reading our JSON never guesses the zone.
Documents that are objects get `"at"`: when labsync read what they show.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime


def iso(ts: datetime | None) -> str | None:
    """`2026-11-24T05:14:07.476718Z`; a naive datetime is UTC (as the warehouse stores it)."""
    if ts is None:
        return None
    ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    return ts.isoformat().replace("+00:00", "Z")


def default(value):
    """json.dumps(default=...): datetimes in ISO 8601 UTC, dates in ISO 8601, the rest as text."""
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def dumps(document, *, indent: int | None = 2) -> str:
    """The document as JSON; an object gets `"at"` (now, UTC) unless it has one."""
    if isinstance(document, dict) and "at" not in document:
        document = {**document, "at": iso(datetime.now(UTC))}
    return json.dumps(document, default=default, indent=indent)
