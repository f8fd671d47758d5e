"""Batch files and rejected rows in the warehouse, and who is processing each file.

A batch is identified by the sha256 of its bytes, so a re-dropped or renamed copy of a file is the
same batch (`register_batch` returns the existing id). Re-validating a batch replaces its rejected
rows rather than adding to them.

Who processes a file is decided here, not by renaming it: `claim_batch` takes the batch's claim
(`claimed_by`, an owner from etl.claims, with a lease) in one conditional UPDATE, so of two runs
that found the same file exactly one goes on; a claim whose lease lapsed is taken over. Writes
made on behalf of a claim go through `fence(...)`, which renews the lease and raises `LostClaim`
when another run has taken the batch over meanwhile, so a run that hung past its lease can never
overwrite the work of the run that replaced it.

This module is the one writer of `batch_files` and `rejected_rows`: the flows call its functions
(some run in the caller's transaction, `conn`) instead of writing those tables themselves.

PHI (issue 23): a rejected cell of a column the contract declares PHI (schemas.columns.PHI,
schemas.order_intents.PHI) is stored as NULL, and its reason names the column and the rule only;
the rejects report and the fix file beside the batch keep the cell for the person who mends the
row. A rejected-row write the database refuses is WarehouseRefused, naming the table and the
error's class, never the row (etl.orders.staging fails that file with it; the run goes on).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy import Engine

from etl.errors import LostClaim, UnusableInputError
from etl.states import BatchStatus
from etl.warehouse import as_refused, batch_files, rejected_rows

if TYPE_CHECKING:  # validation needs pandas; commands that only load a staged batch skip it
    from etl.intake.validate import CsvValidation, ValidationResult

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
                .values(file_name=Path(path).name, sha256=sha256, status=BatchStatus.RECEIVED, received_at=_now())
                .returning(batch_files.c.id)
            ).scalar_one()
    except sa.exc.IntegrityError:  # registered concurrently by another worker
        existing = find_batch(engine, sha256)
        assert existing is not None
        return existing["id"]


def add_batch(engine: Engine, name: str, sha256: str, *, status: str) -> int:
    """A batch row for rows that come from no file (etl.orders.outbox.adhoc_batch); its id."""
    with engine.begin() as conn:
        return conn.execute(
            sa.insert(batch_files)
            .values(file_name=name, sha256=sha256, status=status, received_at=_now())
            .returning(batch_files.c.id)
        ).scalar_one()


def _every_column(_column: str) -> bool:
    return True


def record_rejects(engine: Engine, batch_id: int, rejects_csv: Path | None, *,
                   is_phi: Callable[[str], bool] = _every_column) -> int:
    """Replace the batch's rejected rows with those of a rejects report; return how many.
    `is_phi`: the contract's Contract.is_phi (by default every column is taken for PHI)."""
    with engine.begin() as conn:
        return _record_rejects(conn, batch_id, rejects_csv, is_phi)


def _record_rejects(conn: sa.Connection, batch_id: int, rejects_csv: Path | None,
                    is_phi: Callable[[str], bool]) -> int:
    """Minimum necessary: a PHI column's rejected cell is not stored (NULL); the rejects report
    and the fix file beside the batch keep it for the person who mends the row, and the reason
    names the column and the rule without it (schemas/). A write the database refuses is
    WarehouseRefused (or WarehouseUnavailable), naming the table, never the row."""
    from etl.intake.csvsafe import read_rows

    def insert(rows: list[dict]) -> None:
        try:
            conn.execute(sa.insert(rejected_rows), rows)
        except sa.exc.StatementError as exc:
            plain = as_refused(exc, "to store the batch's rejected rows (table rejected_rows)")
            if plain is None:
                raise
            raise plain from None

    conn.execute(sa.delete(rejected_rows).where(rejected_rows.c.batch_id == batch_id))
    if rejects_csv is None or not Path(rejects_csv).exists():
        return 0
    count = 0
    # the report is formula-safe; read_rows gives back the original values
    page: list[dict] = []
    fixed = ("line", "row", "column", "value", "reason")
    for rec in read_rows(Path(rejects_csv)):
        # the contract's row id (client_order_id, or row_id for intents) is the other column
        id_column = next(k for k in rec if k not in fixed)
        column = rec["column"]
        page.append(
            dict(batch_id=batch_id, line=int(rec["line"]), excel_row=int(rec["row"]) if rec.get("row") else None,
                 client_order_id=rec[id_column] or None, column_name=column,
                 value=None if is_phi(column) else rec["value"] or None, reason=rec["reason"])
        )
        if len(page) >= INSERT_PAGE:
            insert(page)
            count += len(page)
            page = []
    if page:
        insert(page)
        count += len(page)
    return count


def finish_validation(
    engine: Engine, batch_id: int, result: ValidationResult, *, status: str | None = None, fence=None,
) -> None:
    """Store the counts of a completed validation and its rejected rows, in one transaction.

    `status`: `validated` once the batch's outbox rows are all written (etl.orders.staging).
    None (a check-only run, `labsync validate`): a batch that was never staged stays (or becomes
    again) `received`; one already staged or loaded keeps its status: checking a file again
    must not make its outbox look unwritten."""
    b = batch_files
    values = dict(total_rows=result.total_rows, valid_rows=result.valid_rows,
                  rejected_rows=result.rejected_rows)
    with engine.begin() as conn:
        if fence is not None:
            fence(conn)
        _record_rejects(conn, batch_id, result.rejects_path, result.is_phi)
        if status is not None:
            conn.execute(sa.update(b).where(b.c.id == batch_id).values(status=status, error=None, **values))
        else:
            conn.execute(sa.update(b).where(b.c.id == batch_id).values(
                status=sa.case((b.c.status.in_([BatchStatus.RECEIVED, BatchStatus.UNUSABLE]), BatchStatus.RECEIVED),
                               else_=b.c.status),
                error=sa.case((b.c.status == BatchStatus.UNUSABLE, None), else_=b.c.error),
                **values))


def set_status(engine: Engine, batch_id: int, status: str, *, error: str | None = None, fence=None) -> None:
    from etl.redact import clean

    values: dict = {"status": status, "error": clean(error)}  # file names may hold control characters
    if status in (BatchStatus.LOADED, BatchStatus.INCOMPLETE, BatchStatus.UNUSABLE):
        values["processed_at"] = _now()
    with engine.begin() as conn:
        if fence is not None:
            fence(conn)
        conn.execute(sa.update(batch_files).where(batch_files.c.id == batch_id).values(**values))


def restart(conn: sa.Connection, batch_id: int, *, error: str | None = None) -> None:
    """In the caller's transaction: the batch is staged again from the start (`received`, its
    file not stored yet); `error`: why its last staging could not be recorded (no PHI)."""
    conn.execute(sa.update(batch_files).where(batch_files.c.id == batch_id)
                 .values(status=BatchStatus.RECEIVED, error=error, stored_as=None))


def mark_unusable(conn: sa.Connection, batch_id: int, error: str) -> None:
    """In the caller's transaction: the batch is `unusable`, for `error` (already one line)."""
    conn.execute(sa.update(batch_files).where(batch_files.c.id == batch_id)
                 .values(status=BatchStatus.UNUSABLE, error=error, processed_at=_now()))


def finish_if_ours(engine: Engine, batch_id: int, *, owner: str, status: str, among: list[str],
                   lease: timedelta) -> int:
    """Record the batch `status` (and renew the claim for `lease`) if `owner` still holds it and
    its status is one of `among`; how many rows changed (0 or 1)."""
    b = batch_files
    with engine.begin() as conn:
        return conn.execute(
            sa.update(b)
            .where(b.c.id == batch_id, b.c.claimed_by == owner, b.c.status.in_(among))
            .values(status=status, processed_at=_now(), claimed_until=_now() + lease)
        ).rowcount


def settle(engine: Engine, batch_id: int) -> bool:
    """An `incomplete` batch becomes `loaded` (one conditional UPDATE: of several runs noticing
    it, one flips it). True if this call did."""
    with engine.begin() as conn:
        return bool(conn.execute(
            sa.update(batch_files)
            .where(batch_files.c.id == batch_id, batch_files.c.status == BatchStatus.INCOMPLETE)
            .values(status=BatchStatus.LOADED, processed_at=_now())
        ).rowcount)


# ---- claims ------------------------------------------------------------------------------

def claim_batch(engine: Engine, batch_id: int, *, owner: str, lease: timedelta) -> dict | None:
    """Take the batch's claim for `owner` if it is free, lapsed or already ours; return the batch
    row, or None when another live run holds it (one conditional UPDATE: exactly one winner)."""
    now = _now()
    b = batch_files
    with engine.begin() as conn:
        won = conn.execute(
            sa.update(b)
            .where(b.c.id == batch_id,
                   sa.or_(b.c.claimed_by.is_(None), b.c.claimed_by == owner, b.c.claimed_until < now))
            .values(claimed_by=owner, claimed_until=now + lease)
        ).rowcount
        if not won:
            return None
        return dict(conn.execute(sa.select(b).where(b.c.id == batch_id)).mappings().one())


def take_lapsed(conn: sa.Connection, batch_id: int, *, status: str, owner: str, until: datetime,
                now: datetime) -> bool:
    """In the caller's transaction: claim a batch in `status` whose claim is free or lapsed at
    `now` (a run that died before finishing it) for `owner` until `until`. True if taken."""
    b = batch_files
    return bool(conn.execute(
        sa.update(b).where(b.c.id == batch_id, b.c.status == status,
                           sa.or_(b.c.claimed_by.is_(None), b.c.claimed_until < now))
        .values(claimed_by=owner, claimed_until=until)
    ).rowcount)


def fence(batch_id: int, *, owner: str, lease: timedelta):
    """A function for a transaction made on behalf of a claim: renews the lease, and raises
    LostClaim if the claim is no longer ours (the transaction then writes nothing)."""

    def check(conn: sa.Connection) -> None:
        held = conn.execute(
            sa.update(batch_files)
            .where(batch_files.c.id == batch_id, batch_files.c.claimed_by == owner)
            .values(claimed_until=_now() + lease)
        ).rowcount
        if not held:
            raise LostClaim(f"batch {batch_id} was taken over by another run")

    return check


def release_batch(engine: Engine, batch_id: int, *, owner: str, keep_move: bool = False, **values) -> bool:
    """Give up the claim (and set `values` in the same statement) if it is still ours. A move
    recorded by `begin_move` is over once its file is released (`keep_move`: not yet)."""
    if not keep_move:
        values = {"moving_from": None, "moving_to": None, **values}
    with engine.begin() as conn:
        return bool(conn.execute(
            sa.update(batch_files)
            .where(batch_files.c.id == batch_id, batch_files.c.claimed_by == owner)
            .values(claimed_by=None, claimed_until=None, **values)
        ).rowcount)


def release_all(engine: Engine, *, owner: str) -> int:
    """Give up every batch claim `owner` holds (an interrupted run: the next run takes its files
    over without waiting for the lease); how many."""
    with engine.begin() as conn:
        return conn.execute(sa.update(batch_files).where(batch_files.c.claimed_by == owner)
                            .values(claimed_by=None, claimed_until=None)).rowcount


def begin_move(engine: Engine, batch_id: int, source: str, target: str, *, fence) -> None:
    """Record the move of the batch's file before it starts (a copy then a delete on object
    stores), so a run that dies half-way leaves the next run the same target (etl.orders.inbox)."""
    with engine.begin() as conn:
        fence(conn)
        conn.execute(sa.update(batch_files).where(batch_files.c.id == batch_id)
                     .values(moving_from=source, moving_to=target))


def move_target_taken(engine: Engine, target: str) -> bool:
    """Whether an unfinished move of some batch will land at `target` (the name is promised)."""
    with engine.connect() as conn:
        return conn.execute(sa.select(batch_files.c.id).where(batch_files.c.moving_to == target)
                            .limit(1)).first() is not None


def interrupted_moves(engine: Engine) -> list[dict]:
    """Batches with a move recorded whose claim is free or lapsed: their run died mid-move."""
    b = batch_files
    with engine.connect() as conn:
        rows = conn.execute(sa.select(b).where(
            b.c.moving_to.is_not(None), sa.or_(b.c.claimed_by.is_(None), b.c.claimed_until < _now()))
        ).mappings()
        return [dict(r) for r in rows]


def reopen(engine: Engine, batch_id: int, *, fence) -> None:
    """A processed batch dropped again with rows still to send: `validated` (loadable) again,
    its new copy not stored yet."""
    with engine.begin() as conn:
        fence(conn)
        conn.execute(sa.update(batch_files).where(batch_files.c.id == batch_id)
                     .values(status=BatchStatus.VALIDATED, stored_as=None))


def get(engine: Engine, batch_id: int) -> dict:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(batch_files).where(batch_files.c.id == batch_id)).mappings().one())


def recent_query(*, limit: int | None = 20, since: datetime | None = None) -> sa.Select:
    """Batches newest first (by id, the primary key: a listing reads its page, not the
    history), at most `limit` (None: no limit); with `since`, those received at or after it,
    newest first (a range of the index on received_at)."""
    q = sa.select(batch_files).order_by(batch_files.c.id.desc())
    if since is not None:  # a range of ix_batch_files_received_at, newest first
        q = (sa.select(batch_files).where(batch_files.c.received_at >= since)
             .order_by(batch_files.c.received_at.desc(), batch_files.c.id.desc()))
    return q.limit(limit) if limit else q


def recent(engine: Engine, *, limit: int | None = 20, since: datetime | None = None) -> list[dict]:
    """`labsync batches`: the newest batches first (see `recent_query`)."""
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(recent_query(limit=limit, since=since)).mappings()]


def record_unusable(engine: Engine, path: Path | str, sha256: str | None, reason: str) -> int | None:
    """Remember an unusable file (when its bytes could be hashed) with the one-line reason."""
    if sha256 is None:
        return None
    batch_id = register_batch(engine, path, sha256)
    set_status(engine, batch_id, BatchStatus.UNUSABLE, error=reason)
    return batch_id


def open_batch(engine: Engine, path: Path | str, **kw) -> tuple[int, CsvValidation]:
    """File-level checks and registration: (batch id, validation ready to iterate).

    An unusable file is recorded (status `unusable`, with the reason) and the
    UnusableInputError re-raised for the caller to report. `kw` goes to CsvValidation (an order
    batch's caller passes etl.orders.enrich.rupa_lookup_for(engine))."""
    from etl.intake.validate import CsvValidation

    try:
        validation = CsvValidation(path, **kw)
    except UnusableInputError as exc:
        record_unusable(engine, path, getattr(exc, "sha256", None), str(exc))
        raise
    return register_batch(engine, path, validation.sha256), validation


def close_batch(engine: Engine, batch_id: int, validation: CsvValidation) -> ValidationResult:
    """Record the counts and rejected rows of a check-only validation whose chunks() were
    consumed (`labsync validate`): the batch stays `received`, since nothing was staged to send."""
    finish_validation(engine, batch_id, validation.result)
    return validation.result


def rejected(engine: Engine, batch_id: int) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(rejected_rows).where(rejected_rows.c.batch_id == batch_id).order_by(rejected_rows.c.line, rejected_rows.c.id)
        ).mappings()
        return [dict(r) for r in rows]


def rejected_first(engine: Engine, batch_id: int, rows: int) -> list[dict]:
    """Every problem of the batch's first `rows` rejected rows (by line): what a summary page
    shows of a large batch without reading all of its rejected rows."""
    r = rejected_rows
    first = (sa.select(r.c.line).where(r.c.batch_id == batch_id).group_by(r.c.line)
             .order_by(r.c.line).limit(rows).subquery())
    with engine.connect() as conn:
        found = conn.execute(
            sa.select(r).where(r.c.batch_id == batch_id, r.c.line.in_(sa.select(first.c.line)))
            .order_by(r.c.line, r.c.id)
        ).mappings()
        return [dict(x) for x in found]


__all__ = (
    "find_batch", "register_batch", "add_batch", "record_rejects", "finish_validation",
    "set_status", "record_unusable", "rejected", "rejected_first", "open_batch", "close_batch",
    "restart", "mark_unusable", "finish_if_ours", "settle",
    "claim_batch", "take_lapsed", "fence", "release_batch", "release_all", "begin_move", "move_target_taken",
    "interrupted_moves", "reopen", "get", "LostClaim",
)


def purge_rejected_values(conn: sa.Connection, cutoff: datetime, *, dry_run: bool = False) -> list[int]:
    """Retention (etl.retention): drop the rejected cells kept for batches finished (`loaded` or
    `unusable`) before `cutoff`; the fix file beside the batch had them for a person. A batch
    still in progress or `incomplete` (its summary is written again) keeps them. Returns the
    rejected rows' ids (emptied unless `dry_run`)."""
    b, r = batch_files, rejected_rows
    finished = sa.select(b.c.id).where(b.c.status.in_([BatchStatus.LOADED.value, BatchStatus.UNUSABLE.value]),
                                       sa.func.coalesce(b.c.processed_at, b.c.received_at) < cutoff)
    where = sa.and_(r.c.batch_id.in_(finished), r.c.value.is_not(None))
    ids = [int(i) for i in conn.execute(sa.select(r.c.id).where(where).order_by(r.c.id)).scalars()]
    if ids and not dry_run:
        conn.execute(sa.update(r).where(r.c.id.in_(ids), where).values(value=None))
    return ids
