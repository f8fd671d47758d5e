"""`lgc_order_programs`: which program (programCode) and participant each clientOrderId belongs
to. The PUT body holds both but is dropped (and was sealed) once the order settles, so the
outbox records them here in the same transaction as it stages the row. The one writer of the
table. PHI-free: a program code and the client's own participant id."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from etl.warehouse.tables import lgc_order_programs

t = lgc_order_programs


def _text(value: Any, limit: int = 200) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text[:limit] or None


def row_of(row: Mapping[str, Any], client_order_id: str | None, batch_id: int | None,
           now: datetime) -> dict | None:
    """A validated CSV row -> its program row (None without a clientOrderId)."""
    coid = _text(client_order_id, 100)
    if coid is None:
        return None
    return dict(client_order_id=coid, program_code=_text(row.get("program_code")),
                participant_id=_text(row.get("participant_id")), batch_id=batch_id, recorded_at=now)


def record(conn: sa.Connection, rows: Iterable[Mapping[str, Any]]) -> int:
    """Insert the program rows not held yet (a clientOrderId keeps the program it was first
    sent with, as LetsGetChecked keeps the order). Returns how many were new."""
    rows = [dict(r) for r in rows]
    if not rows:
        return 0
    insert = postgresql.insert(t) if conn.dialect.name == "postgresql" else sqlite.insert(t)
    result = conn.execute(insert.on_conflict_do_nothing(index_elements=["client_order_id"]), rows)
    return max(result.rowcount or 0, 0)
