"""Stage a batch file: claim it in the warehouse, validate the WHOLE file, write its outbox.

    taken = take(engine, settings, name, sha256, owner=...)  # None: another live run has it
    staged = stage(engine, settings, taken, path, owner=...)  # unusable -> nothing loadable
    ... load the batch's chunks (etl.orders.load.load_chunk) ...
    status = finish(engine, settings, batch_id, owner=...)    # loaded | incomplete; None if not ours

The inbox (etl.orders.inbox) and `labsync load FILE` both go this way, so nothing is ever sent
for a file that proves unusable anywhere in it: the batch's outbox rows become loadable only
when the batch is `validated`, set in the transaction that records the end of its validation;
a file found unusable on its last line has the rows written so far deleted and becomes
`unusable`. Every write is fenced by the batch's claim (etl.intake.records.fence).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import Engine

from etl.errors import UnusableInputError, WarehouseRefused
from etl.intake import records
from etl.intake.names import fix_path_for, rejects_path_for
from etl.orders import outbox
from etl.orders.enrich import rupa_lookup_for
from etl.settings import Settings
from etl.states import BatchStatus, OutboxState
from etl.vault import vault_for
from etl.warehouse import lgc_outbox

VALIDATION_CHUNK_ROWS = 20_000  # rows validated (and staged) per step: bounds memory


def sha256_of(path: Path) -> str:
    """The batch's identity: the sha256 of the file's bytes (FileNotFoundError if it is gone)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def lease(settings: Settings) -> timedelta:
    return timedelta(seconds=settings.lease_seconds)


@dataclass(frozen=True)
class Taken:
    """A batch whose claim we hold, as it stood when we took it."""

    batch_id: int
    row: dict

    @property
    def status(self) -> str:
        return self.row["status"]


@dataclass(frozen=True)
class Staged:
    batch_id: int
    status: str  # validated | unusable
    total_rows: int = 0
    valid_rows: int = 0
    rejected_rows: int = 0
    problems: int = 0
    error: str | None = None
    rejects_path: Path | None = None
    summary: str = ""  # the validation's one-line summary

    def as_dict(self) -> dict:
        return {"batch_id": self.batch_id, "status": self.status, "total_rows": self.total_rows,
                "valid_rows": self.valid_rows, "rejected_rows": self.rejected_rows,
                "problems": self.problems, "error": self.error}


def take(engine: Engine, settings: Settings, name: str, sha256: str, *, owner: str) -> Taken | None:
    """Register the file's batch (by content) and claim it for `owner`; None when another live
    run is processing it."""
    batch_id = records.register_batch(engine, name, sha256)
    row = records.claim_batch(engine, batch_id, owner=owner, lease=lease(settings))
    return Taken(batch_id, row) if row is not None else None


def needs_validation(engine: Engine, taken: Taken) -> bool:
    """A new (or half-validated) batch, or one recorded without an outbox (checked only by
    `labsync validate`, or loaded by a version of labsync before the outbox) whose valid rows
    would otherwise never be staged."""
    if taken.status == BatchStatus.RECEIVED:
        return True
    if taken.status == BatchStatus.UNUSABLE or not taken.row.get("valid_rows"):
        return False
    with engine.connect() as conn:
        staged_rows = conn.execute(
            sa.select(sa.func.count()).select_from(lgc_outbox).where(lgc_outbox.c.batch_id == taken.batch_id)
        ).scalar_one()
    return staged_rows == 0


def _rows(validation) -> Iterator[dict]:
    for chunk in validation.chunks():
        yield from chunk


def stage(
    engine: Engine, settings: Settings, taken: Taken, path: Path, *, owner: str,
    rejects_path: Path | None = None, fix_path: Path | None = None,
) -> Staged:
    """Validate the whole file and write its outbox (bodies built once, in bulk). The batch is
    `validated` (loadable) only at the end; an unusable file leaves no outbox rows and the batch
    `unusable` with the one-line reason. Raises LostClaim if another run took the batch over."""
    from etl.intake.validate import CsvValidation  # pandas: only when a file is validated

    batch_id = taken.batch_id
    fence = records.fence(batch_id, owner=owner, lease=lease(settings))
    with engine.begin() as conn:  # a half-written outbox of a run that died is ours to redo
        fence(conn)
        outbox.delete_batch(conn, batch_id)
        records.restart(conn, batch_id)
    rejects = rejects_path or rejects_path_for(path)
    fix = fix_path or fix_path_for(path)
    try:
        validation = CsvValidation(path, rupa_lookup=rupa_lookup_for(engine), rejects_path=rejects,
                                   fix_path=fix, chunk_rows=VALIDATION_CHUNK_ROWS,
                                   sha256=taken.row.get("sha256"))  # hashed once, when it was taken
        outbox.write(engine, batch_id, _rows(validation), fence=fence,
                     vault=vault_for(settings.fernet_key, engine))
    except UnusableInputError as exc:
        reason = str(exc)
        with engine.begin() as conn:
            fence(conn)
            outbox.delete_batch(conn, batch_id)
            records.mark_unusable(conn, batch_id, reason)
        for leftover in (rejects.with_name(rejects.name + ".tmp"), rejects, fix.with_name(fix.name + ".tmp"), fix):
            leftover.unlink(missing_ok=True)  # a report of a file that was never usable misleads
        return Staged(batch_id, BatchStatus.UNUSABLE, error=reason)
    result = validation.result
    try:
        records.finish_validation(engine, batch_id, result, status=BatchStatus.VALIDATED, fence=fence)
    except WarehouseRefused as exc:  # this file fails, with a plain reason; the run goes on
        reason = (f"{path.name}: {exc}; nothing was sent. The warehouse's log names the rule that "
                  "refused them; once it accepts them, the file is checked again when it is dropped again")
        with engine.begin() as conn:  # nothing of it is loadable; `received`: a new drop stages it again
            fence(conn)
            outbox.delete_batch(conn, batch_id)
            records.restart(conn, batch_id, error=reason)
        for leftover in (rejects, fix):
            leftover.unlink(missing_ok=True)
        return Staged(batch_id, BatchStatus.UNUSABLE, error=reason)
    return Staged(batch_id, BatchStatus.VALIDATED, result.total_rows, result.valid_rows,
                  result.rejected_rows, result.problems, None, result.rejects_path, result.summary())


def final_status(counts) -> str:
    """`loaded` when every staged row is settled; `incomplete` while any may still go out or
    waits for a person (given up)."""
    if outbox.unsettled(counts) or counts.get(OutboxState.GIVEN_UP):
        return BatchStatus.INCOMPLETE
    return BatchStatus.LOADED


def finish(engine: Engine, settings: Settings, batch_id: int, *, owner: str) -> str | None:
    """Record the batch `loaded` or `incomplete` from its outbox, if `owner` still holds it (the
    claim makes this one finisher; a run that lost the batch to another finishes nothing).
    Returns the status, or None when the batch is not ours any more. The claim is kept: the
    caller releases it once the file is where it belongs."""
    status = final_status(outbox.counts(engine, [batch_id])[batch_id])
    done = records.finish_if_ours(
        engine, batch_id, owner=owner, status=status,
        among=[BatchStatus.VALIDATED, BatchStatus.LOADED, BatchStatus.INCOMPLETE], lease=lease(settings))
    return status if done else None


def settle(engine: Engine, batch_id: int) -> bool:
    """An `incomplete` batch whose last unsettled row has settled becomes `loaded` (one
    conditional UPDATE: of several runs noticing it, one flips it). True if this call did."""
    if final_status(outbox.counts(engine, [batch_id])[batch_id]) != BatchStatus.LOADED:
        return False
    return records.settle(engine, batch_id)
