"""Dialect-aware batched upsert (INSERT ... ON CONFLICT DO UPDATE) for SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql, sqlite


def upsert(
    conn: Connection,
    table: Table,
    rows: Sequence[dict],
    *,
    key: Iterable[str],
    update: Iterable[str] | None = None,
) -> None:
    """Insert `rows`, updating `update` columns (default: every non-key column present in the
    rows) where a row with the same `key` exists. One statement per call: pass a page at a time."""
    if not rows:
        return
    key = list(key)
    dialect = conn.dialect.name
    stmt: postgresql.Insert | sqlite.Insert
    if dialect == "postgresql":
        stmt = postgresql.insert(table)
    elif dialect == "sqlite":
        stmt = sqlite.insert(table)
    else:  # pragma: no cover - only the two supported warehouses
        raise NotImplementedError(f"upsert is not implemented for {dialect}")
    cols = list(update) if update is not None else [c for c in rows[0] if c not in key]
    if cols:
        stmt = stmt.on_conflict_do_update(
            index_elements=key, set_={c: getattr(stmt.excluded, c) for c in cols}
        )
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=key)
    conn.execute(stmt, list(rows))
