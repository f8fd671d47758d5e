"""The plan a warehouse chooses for a statement: `EXPLAIN QUERY PLAN` on SQLite, `EXPLAIN` on
PostgreSQL, one line per step. bench/scale.py prints them; tests/test_scale_plans.py checks that
the statements a batch or a lifecycle run makes use the indexes that bound them (issue 27)."""

from __future__ import annotations

import sqlalchemy as sa


def explain(conn: sa.Connection, stmt: sa.ClauseElement) -> list[str]:
    """The plan of `stmt` (its parameters rendered in place) on this connection's warehouse."""
    sql = str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    if conn.dialect.name == "sqlite":
        rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql).all()
        return [str(r[-1]) for r in rows]
    return [str(r[0]) for r in conn.exec_driver_sql("EXPLAIN " + sql.replace("%", "%%")).all()]


def uses_index(plan: list[str], index: str) -> bool:
    """Whether the plan reads through the index named `index`."""
    return any(index in line for line in plan)


def full_scans(plan: list[str], tables: list[str] | tuple[str, ...]) -> list[str]:
    """The plan's lines that read one of `tables` whole (SQLite `SCAN t` without an index,
    PostgreSQL `Seq Scan on t`)."""
    out = []
    for line in plan:
        text = line.strip()
        for t in tables:
            if (text.startswith(f"SCAN {t}") and "INDEX" not in text) or f"Seq Scan on {t} " in text + " ":
                out.append(text)
    return out
