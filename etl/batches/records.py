"""Batch files and rejected rows in the warehouse.

A batch is identified by the sha256 of its bytes, so a re-dropped or renamed copy of a file is the
same batch (`register_batch` returns the existing id). Re-validating a batch replaces its rejected
rows rather than adding to them.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import Engine

from etl.batches.validate import REJECT_COLUMNS, CsvValidation, RupaLookup, ValidationResult
from etl.errors import UnusableInputError
from etl.warehouse import batch_files, rejected_rows

INSERT_PAGE = 5_000


def _now() -> datetime:
    return datetime.now(UTC)


def find_batch(engine: Engine, sha256: str) -> dict | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(batch_files).where(batch_files.c.sha256 == sha256)).mappings().first()
    return dict(row) if row else None


def register_batch(engine: Engine, path: Path | str, sha256: str) -> int:
    """The batch id for this file's content, creating the row (status `received`) if new."""
    existing = find_batch(engine, sha256)
    if existing:
        return existing["id"]
    try:
        with engine.begin() as conn:
            return conn.execute(
                sa.insert(batch_files)
                .values(file_name=Path(path).name, sha256=sha256, status="received", received_at=_now())
                .returning(batch_files.c.id)
            ).scalar_one()
    except sa.exc.IntegrityError:  # registered concurrently by another worker
        existing = find_batch(engine, sha256)
        assert existing is not None
        return existing["id"]


def record_rejects(engine: Engine, batch_id: int, rejects_csv: Path | None) -> int:
    """Replace the batch's rejected rows with those of a rejects report; return how many."""
    import csv

    with engine.begin() as conn:
        conn.execute(sa.delete(rejected_rows).where(rejected_rows.c.batch_id == batch_id))
        if rejects_csv is None or not Path(rejects_csv).exists():
            return 0
        count = 0
        with open(rejects_csv, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            id_column = (reader.fieldnames or REJECT_COLUMNS)[1]  # the contract's row id (client_order_id, row_id)
            page: list[dict] = []
            for rec in reader:
                page.append(
                    dict(batch_id=batch_id, line=int(rec["line"]), client_order_id=rec[id_column] or None,
                         column_name=rec["column"], value=rec["value"] or None, reason=rec["reason"])
                )
                if len(page) >= INSERT_PAGE:
                    conn.execute(sa.insert(rejected_rows), page)
                    count += len(page)
                    page = []
            if page:
                conn.execute(sa.insert(rejected_rows), page)
                count += len(page)
    return count


def finish_validation(engine: Engine, batch_id: int, result: ValidationResult) -> None:
    """Store the counts of a completed validation and its rejected rows (status `validated`)."""
    record_rejects(engine, batch_id, result.rejects_path)
    with engine.begin() as conn:
        conn.execute(
            sa.update(batch_files)
            .where(batch_files.c.id == batch_id)
            .values(status="validated", total_rows=result.total_rows, valid_rows=result.valid_rows,
                    rejected_rows=result.rejected_rows, error=None)
        )


def set_status(engine: Engine, batch_id: int, status: str, *, error: str | None = None) -> None:
    values: dict = {"status": status, "error": error}
    if status in ("loaded", "incomplete", "unusable"):
        values["processed_at"] = _now()
    with engine.begin() as conn:
        conn.execute(sa.update(batch_files).where(batch_files.c.id == batch_id).values(**values))


def record_unusable(engine: Engine, path: Path | str, sha256: str | None, reason: str) -> int | None:
    """Remember an unusable file (when its bytes could be hashed) with the one-line reason."""
    if sha256 is None:
        return None
    batch_id = register_batch(engine, path, sha256)
    set_status(engine, batch_id, "unusable", error=reason)
    return batch_id


def rupa_lookup_for(engine: Engine) -> RupaLookup:
    """Resolve rupa_patient_id against the warehouse's copy of Rupa patients (lazily imported so
    validation works without the Rupa module's dependencies)."""

    def lookup(ids: list[str]) -> dict[str, dict]:
        from etl.rupa.enrich import make_rupa_lookup

        return make_rupa_lookup(engine)(ids)

    return lookup


def open_batch(engine: Engine, path: Path | str, **kw) -> tuple[int, CsvValidation]:
    """File-level checks and registration: (batch id, validation ready to iterate).

    An unusable file is recorded (status `unusable`, with the reason) and the
    UnusableInputError re-raised for the caller to report."""
    kw.setdefault("rupa_lookup", rupa_lookup_for(engine))
    try:
        validation = CsvValidation(path, **kw)
    except UnusableInputError as exc:
        record_unusable(engine, path, getattr(exc, "sha256", None), str(exc))
        raise
    return register_batch(engine, path, validation.sha256), validation


def close_batch(engine: Engine, batch_id: int, validation: CsvValidation) -> ValidationResult:
    """Record the counts and rejected rows of a validation whose chunks() were consumed."""
    finish_validation(engine, batch_id, validation.result)
    return validation.result


def rejected(engine: Engine, batch_id: int) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(rejected_rows).where(rejected_rows.c.batch_id == batch_id).order_by(rejected_rows.c.line, rejected_rows.c.id)
        ).mappings()
        return [dict(r) for r in rows]


__all__: Iterable[str] = (
    "REJECT_COLUMNS", "find_batch", "register_batch", "record_rejects", "finish_validation",
    "set_status", "record_unusable", "rejected", "open_batch", "close_batch", "rupa_lookup_for",
)
