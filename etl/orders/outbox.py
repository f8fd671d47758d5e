"""The order outbox (`lgc_outbox`): every valid row of a batch as the exact PUT body to send.

Written in bulk by `prepare` (through `write`) once a file has been read; read back by the load
tasks in id ranges (`Chunk`), so nothing passes between tasks or workers on a local disk and XCom
carries only `{"batch_id", "first_id", "last_id", "rows", "file"}`. Each row keeps its own outcome
(etl.states.OutboxState) and its attempts across runs, so a batch's counts come from this one
table, and rows that did not go through are sent again by later runs (`retry_batches`,
`labsync retry`) from the stored body, with no file needed.

PHI: `body` holds the patient's data, so it is stored encrypted (etl.vault: Fernet, the key of
LABSYNC_FERNET_KEY, as for the stored tokens) and set to NULL in the same statement that records
a row as settled (accepted, rejected, conflict, already_settled). It is kept while the row may
still have to go out (queued, pending, failed, unconfirmed) or waits for a person (given_up).

This module is the one writer of `lgc_outbox`. The ledger (etl.orders.ledger) writes a row's
outcome in the same transaction as its own: it calls the functions here that take its `conn`
(`mark_pending`, `mark_settled`, `record_results`, `confirm_accepted`, `note_unclaimed`), and the
statements stay as they were, prebuilt where they are on the load's hot path.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine, bindparam
from sqlalchemy.dialects import postgresql, sqlite

from etl.claims import now as _now
from etl.intake import records
from etl.orders import programs
from etl.orders.payload import PayloadError, build_payload, client_order_id, payload_sha256
from etl.states import RETRYABLE_OUTBOX_STATES, SETTLED_OUTBOX_STATES, BatchStatus, OutboxState
from etl.warehouse.tables import batch_files, lgc_orders, lgc_outbox

if TYPE_CHECKING:  # the callers hand a vault in; the ledger, which imports this module, needs none
    from etl.vault import Vault

o = lgc_outbox
INSERT_PAGE = 2_000
RETRYABLE = sorted(RETRYABLE_OUTBOX_STATES)


def body_bytes(body: Mapping[str, Any]) -> bytes:
    """The exact bytes sent (document key order, compact, UTF-8)."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Prepared:
    """One outbox row ready to go: where it came from, its body and the body's hash."""

    outbox_id: int
    batch_id: int
    client_order_id: str
    line: int | None
    body: dict | None  # None: parsed from `content` only when needed (the loader's reads)
    content: bytes
    sha256: str
    attempts: int = 0  # loads that sent this outbox row before


@dataclass(frozen=True)
class Chunk:
    """A range of one batch's outbox rows for one load task. PHI-free, JSON-safe (XCom).
    first_line/last_line: the file lines its rows came from (for people: the task's label)."""

    batch_id: int
    first_id: int
    last_id: int
    rows: int
    file: str = ""
    first_line: int = 0
    last_line: int = 0

    def as_dict(self) -> dict:
        return {"batch_id": self.batch_id, "first_id": self.first_id, "last_id": self.last_id,
                "rows": self.rows, "file": self.file, "first_line": self.first_line,
                "last_line": self.last_line}

    @classmethod
    def of(cls, d: Mapping[str, Any]) -> Chunk:
        return cls(int(d["batch_id"]), int(d["first_id"]), int(d["last_id"]), int(d["rows"]), str(d.get("file") or ""),
                   int(d.get("first_line") or 0), int(d.get("last_line") or 0))


@dataclass
class Written:
    rows: int = 0  # outbox rows written (queued, or rejected when unmappable)
    unmappable: int = 0  # rows that passed validation but cannot be mapped: outcome rejected
    duplicates: int = 0  # rows repeating a clientOrderId of the same call: not written
    existing: int = 0  # rows the batch already had (written by an earlier call): kept as they are


def _insert(conn: Connection):
    return postgresql.insert(o) if conn.dialect.name == "postgresql" else sqlite.insert(o)


def staged(row: Mapping[str, Any], batch_id: int, now: datetime, vault: Vault | None) -> dict:
    """One validated row -> its outbox row: the body built once, by the one mapping
    (etl.orders.payload), and sealed by the vault (`None` only for the dry run, which stores
    nothing). A row that cannot be mapped is stored `rejected` with the reason, no body."""
    coid = client_order_id(row)
    line = row.get("line")
    try:
        body = build_payload(row)
    except PayloadError as exc:
        reason = f"row cannot be mapped to an order: {exc}"
        return dict(batch_id=batch_id, line=line, client_order_id=coid, body=None,
                    body_sha256=payload_sha256({"unmappable": reason}), outcome=OutboxState.REJECTED,
                    attempts=0, last_error=reason, created_at=now, updated_at=now)
    return dict(batch_id=batch_id, line=line, client_order_id=coid, body=_sealed(body_bytes(body).decode(), vault),
                body_sha256=payload_sha256(body), outcome=OutboxState.QUEUED, attempts=0,
                last_error=None, created_at=now, updated_at=now)


def _sealed(text: str, vault: Vault | None) -> str:
    return text if vault is None else vault.seal(text)


def write(
    engine: Engine,
    batch_id: int,
    rows: Iterable[Mapping[str, Any]],
    *,
    vault: Vault,
    fence: Callable[[Connection], None] | None = None,
    page: int = INSERT_PAGE,
) -> Written:
    """Write the outbox rows of `rows` for a batch, a page per transaction (executemany); each
    body sealed by `vault` (etl.vault.vault_for(settings.fernet_key, engine)).

    `fence(conn)` runs first in every page's transaction: the caller checks there that it
    still owns the batch (and renews its lease), so a run that lost its claim cannot add rows
    to a batch another run took over. A clientOrderId repeated within `rows` is written once
    (the others counted in `duplicates`); one the batch already had keeps its row (`existing`)."""
    done = Written()
    seen: set[str] = set()
    buf: list[dict] = []

    def flush() -> None:
        if not buf:
            return
        with engine.begin() as conn:
            if fence is not None:
                fence(conn)
            stmt = _insert(conn).on_conflict_do_nothing(index_elements=["batch_id", "client_order_id"])
            inserted = len(conn.execute(stmt.returning(o.c.id), buf).all())
            programs.record(conn, progs)  # the program of each order (issue 25), PHI-free
        done.rows += inserted
        done.existing += len(buf) - inserted
        if inserted == len(buf):
            done.unmappable += sum(1 for r in buf if r["outcome"] == OutboxState.REJECTED)
        buf.clear()
        progs.clear()

    now = _now()
    progs: list[dict] = []
    for row in rows:
        item = staged(row, batch_id, now, vault)
        if item["client_order_id"] in seen:
            done.duplicates += 1
            continue
        seen.add(item["client_order_id"])
        buf.append(item)
        if (prog := programs.row_of(row, item["client_order_id"], batch_id, now)) is not None:
            progs.append(prog)
        if len(buf) >= page:
            flush()
    flush()
    return done


def delete_batch(conn: Connection, batch_id: int) -> int:
    """Drop a batch's outbox rows (a file that proved unusable; a re-validation after takeover)."""
    return conn.execute(sa.delete(o).where(o.c.batch_id == batch_id)).rowcount


def _loadable(max_attempts: int):
    return sa.and_(o.c.outcome.in_(RETRYABLE), o.c.body.is_not(None), o.c.attempts < max_attempts)


def chunks(
    engine: Engine,
    batch_ids: Sequence[int],
    size: int,
    *,
    max_attempts: int,
    names: Mapping[int, str] | None = None,
) -> list[Chunk]:
    """Split the loadable rows (queued, pending, failed, with a body) of these batches into id
    ranges of at most `size` rows, in one query (a window function numbers the rows)."""
    if not batch_ids:
        return []
    numbered = (
        sa.select(
            o.c.batch_id, o.c.id, o.c.line,
            ((sa.func.row_number().over(partition_by=o.c.batch_id, order_by=o.c.id) - 1) // size).label("g"),
        )
        .where(o.c.batch_id.in_(list(batch_ids)), _loadable(max_attempts))
        .subquery()
    )
    q = (
        sa.select(numbered.c.batch_id, sa.func.min(numbered.c.id), sa.func.max(numbered.c.id), sa.func.count(),
                  sa.func.min(numbered.c.line), sa.func.max(numbered.c.line))
        .group_by(numbered.c.batch_id, numbered.c.g)
        .order_by(numbered.c.batch_id, sa.func.min(numbered.c.id))
    )
    with engine.connect() as conn:
        return [Chunk(b, first, last, n, (names or {}).get(b, ""), lo or 0, hi or 0)
                for b, first, last, n, lo, hi in conn.execute(q)]


def read(
    conn: Connection, chunk: Chunk, *, after_id: int, limit: int, max_attempts: int, vault: Vault
) -> list[Prepared]:
    """The next `limit` loadable rows of a chunk after `after_id`, oldest first (keyset paging),
    their bodies opened by `vault`."""
    rows = conn.execute(
        sa.select(o.c.id, o.c.client_order_id, o.c.line, o.c.body, o.c.body_sha256, o.c.attempts)
        .where(o.c.batch_id == chunk.batch_id, o.c.id > after_id, o.c.id <= chunk.last_id,
               _loadable(max_attempts))
        .order_by(o.c.id)
        .limit(limit)
    ).all()
    # the bytes to send are all the loader needs: the body is parsed only if an error answer
    # needs it (etl.lgc.client), not for every row
    return [Prepared(r.id, chunk.batch_id, r.client_order_id, r.line, None, vault.open(r.body).encode(),
                     r.body_sha256, r.attempts) for r in rows]


def pages(engine: Engine, chunk: Chunk, *, size: int, max_attempts: int, vault: Vault,
          first: int | None = None) -> Iterator[list[Prepared]]:
    """The chunk's loadable rows, `size` at a time (`first` for the first page: a small one
    lets sending start sooner)."""
    after = chunk.first_id - 1
    limit = first or size
    while True:
        with engine.connect() as conn:
            page = read(conn, chunk, after_id=after, limit=limit, max_attempts=max_attempts, vault=vault)
        limit = size
        if not page:
            return
        after = page[-1].outbox_id
        yield page


def fail_rest(engine: Engine, chunk: Chunk, reason: str, *, max_attempts: int) -> int:
    """A load that stopped (breaker, deadline, refused credentials) records the rows of its range
    it never read as `failed` with the same true reason, without spending an attempt: they go
    out on a later run like any failed row. Returns how many rows it marked."""
    with engine.begin() as conn:
        return int(conn.execute(
            sa.update(o)
            .where(o.c.batch_id == chunk.batch_id, o.c.id.between(chunk.first_id, chunk.last_id),
                   o.c.outcome == OutboxState.QUEUED, _loadable(max_attempts))
            .values(outcome=OutboxState.FAILED, last_error=reason, updated_at=_now())
        ).rowcount or 0)


def counts(engine: Engine, batch_ids: Sequence[int]) -> dict[int, Counter]:
    """Rows per outcome for each batch."""
    out: dict[int, Counter] = {b: Counter() for b in batch_ids}
    if not batch_ids:
        return out
    with engine.connect() as conn:
        for b, outcome, n in conn.execute(
            sa.select(o.c.batch_id, o.c.outcome, sa.func.count())
            .where(o.c.batch_id.in_(list(batch_ids)))
            .group_by(o.c.batch_id, o.c.outcome)
        ):
            out[b][outcome] = n
    return out


def unsettled(c: Mapping[str, int]) -> int:
    """Rows of a batch that may still go out by themselves."""
    return sum(c.get(s, 0) for s in RETRYABLE_OUTBOX_STATES)


def rows_of(engine: Engine, batch_id: int) -> list[dict]:
    """Every outbox row of a batch with the ledger's order-item ids, for summaries and status
    (PHI-free: no body)."""
    q = (
        sa.select(
            o.c.id, o.c.client_order_id, o.c.batch_id, batch_files.c.file_name.label("batch"), o.c.line,
            o.c.outcome.label("state"), o.c.http_status, o.c.attempts, o.c.last_error,
            o.c.body_sha256.label("payload_sha256"), lgc_orders.c.order_item_ids,
            o.c.created_at, o.c.updated_at,
        )
        .select_from(
            o.join(batch_files, o.c.batch_id == batch_files.c.id)
            .outerjoin(lgc_orders, sa.and_(lgc_orders.c.client_order_id == o.c.client_order_id,
                                           lgc_orders.c.payload_sha256 == o.c.body_sha256))
        )
        .where(o.c.batch_id == batch_id)
        .order_by(o.c.line, o.c.id)
    )
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(q)]
    for r in rows:  # order items belong to accepted rows only (a conflict row's ids are another's)
        if r["state"] not in (OutboxState.ACCEPTED, OutboxState.ALREADY_SETTLED):
            r["order_item_ids"] = None
    return rows


def given_up(engine: Engine, batch_ids: Sequence[int] | None = None) -> int:
    q = sa.select(sa.func.count()).select_from(o).where(o.c.outcome == OutboxState.GIVEN_UP)
    if batch_ids is not None:
        q = q.where(o.c.batch_id.in_(list(batch_ids)))
    with engine.connect() as conn:
        return conn.execute(q).scalar_one()


def reset_given_up(engine: Engine, batch_ids: Sequence[int] | None = None) -> int:
    """A person asks for given-up rows to go out again (the file dropped again, or
    `labsync retry --given-up`): back to `failed` with a fresh attempt budget."""
    q = sa.update(o).where(o.c.outcome == OutboxState.GIVEN_UP, o.c.body.is_not(None))
    if batch_ids is not None:
        q = q.where(o.c.batch_id.in_(list(batch_ids)))
    with engine.begin() as conn:
        return conn.execute(q.values(outcome=OutboxState.FAILED, attempts=0, updated_at=_now())).rowcount


def give_up_exhausted(engine: Engine, batch_ids: Sequence[int], *, max_attempts: int, now: datetime) -> int:
    """Rows sent `max_attempts` times that are still not settled become `given_up` (unless a live
    claim is sending them right now)."""
    if not batch_ids:
        return 0
    live = sa.exists().where(lgc_orders.c.client_order_id == o.c.client_order_id,
                             lgc_orders.c.claimed_by.is_not(None), lgc_orders.c.claimed_until >= now)
    with engine.begin() as conn:
        return conn.execute(
            sa.update(o)
            .where(o.c.batch_id.in_(list(batch_ids)), o.c.outcome.in_(RETRYABLE),
                   o.c.attempts >= max_attempts, ~live)
            .values(outcome=OutboxState.GIVEN_UP,
                    last_error=sa.func.coalesce(o.c.last_error, "no outcome after the last attempt"),
                    updated_at=now)
        ).rowcount


def retry_batches(engine: Engine, *, owner: str, lease_until: datetime, now: datetime, max_attempts: int) -> list[int]:
    """Batches whose unsettled rows go out again now: `incomplete` batches that still have rows
    to send (rows that used their `max_attempts` become `given_up` first), and each `validated`
    batch whose claimer's lease lapsed (its run died before finishing), which `owner` claims
    here so that only one run resumes it."""
    b = batch_files
    with engine.connect() as conn:
        incomplete = list(conn.execute(sa.select(b.c.id).where(b.c.status == BatchStatus.INCOMPLETE)).scalars())
    give_up_exhausted(engine, incomplete, max_attempts=max_attempts, now=now)
    with engine.begin() as conn:
        has_work = sa.exists().where(o.c.batch_id == b.c.id, _loadable(max_attempts))
        resumable = list(conn.execute(
            sa.select(b.c.id).where(b.c.status == BatchStatus.INCOMPLETE, has_work)).scalars())
        orphans = list(conn.execute(
            sa.select(b.c.id).where(b.c.status == BatchStatus.VALIDATED,
                                    sa.or_(b.c.claimed_by.is_(None), b.c.claimed_until < now))
        ).scalars())
        taken = []
        for batch_id in orphans:
            if records.take_lapsed(conn, batch_id, status=BatchStatus.VALIDATED, owner=owner,
                                   until=lease_until, now=now):
                taken.append(batch_id)
    give_up_exhausted(engine, taken, max_attempts=max_attempts, now=now)
    return sorted(resumable + taken)


def adhoc_batch(engine: Engine, name: str = "(rows)") -> int:
    """A batch for rows that come from no file (`load_rows`: tests and benches)."""
    return records.add_batch(engine, name, uuid.uuid4().hex.ljust(64, "0"), status=BatchStatus.VALIDATED)


# ---- the ledger's writes: in the ledger's transaction (`conn`), with its ledger rows ----------------

def mark_pending(conn: Connection, ids: Sequence[int], now: datetime) -> None:
    """The rows `ids` are claimed to be sent: `pending` (ids in order: concurrent transactions lock
    them in the same order)."""
    conn.execute(sa.update(o).where(o.c.id.in_(ids)).values(outcome=OutboxState.PENDING, updated_at=now))


def mark_settled(conn: Connection, rows: Sequence[Mapping[str, Any]], now: datetime) -> None:
    """Rows that need no sending get their outcome, and their body goes (executemany). Each row:
    k_id (the outbox id), v_outcome, v_error, v_status (the HTTP status, or None)."""
    conn.execute(
        sa.update(o).where(o.c.id == bindparam("k_id"))
        .values(outcome=bindparam("v_outcome"), last_error=bindparam("v_error"),
                http_status=bindparam("v_status"), body=None, updated_at=now),
        rows,
    )


def _outbox_update(*, drop_body: bool):
    still_ours = sa.exists().where(lgc_orders.c.client_order_id == bindparam("k_coid"),
                                   lgc_orders.c.claimed_by == bindparam("k_owner"))
    values: dict[str, Any] = dict(
        outcome=bindparam("v_outcome"), http_status=bindparam("v_status"),
        attempts=bindparam("v_tries"), last_error=bindparam("v_error"), updated_at=bindparam("v_now"),
    )
    if drop_body:
        values["body"] = None  # settled: the PHI goes
    return sa.update(o).where(o.c.id == bindparam("k_id"), still_ours).values(**values)


# prebuilt: the load's hot path (etl.orders.ledger.record, once per window of rows)
_record_settled, _record_open = _outbox_update(drop_body=True), _outbox_update(drop_body=False)


def record_results(conn: Connection, settled: Sequence[Mapping[str, Any]],
                   open_: Sequence[Mapping[str, Any]]) -> None:
    """The outcomes of sent (or released) rows, executemany: `settled` rows lose their body,
    `open_` rows keep it. A row is written only while its ledger row is still claimed by k_owner
    (a claim taken over meanwhile is left to the new owner). Each row: k_id, k_coid, k_owner,
    v_outcome, v_status, v_tries, v_error, v_now."""
    if settled:
        conn.execute(_record_settled, settled)
    if open_:
        conn.execute(_record_open, open_)


def confirm_accepted(conn: Connection, client_order_id: str, body_sha256: str, *, note: str,
                     now: datetime) -> None:
    """The rows that sent this body and were left `unconfirmed` (or given up) after a 2xx become
    `accepted` with `note` (their PHI body goes: settled)."""
    conn.execute(
        sa.update(o)
        .where(o.c.client_order_id == client_order_id, o.c.body_sha256 == body_sha256,
               o.c.outcome.in_([OutboxState.UNCONFIRMED, OutboxState.GIVEN_UP]),
               o.c.http_status.between(200, 299))
        .values(outcome=OutboxState.ACCEPTED, last_error=note, body=None, updated_at=now)
    )


def note_unclaimed(conn: Connection, *, owner: str, error: str, now: datetime) -> None:
    """`pending` rows whose ledger row `owner` holds (about to be unclaimed) keep `error` as the
    true reason they were not settled."""
    held_here = sa.exists().where(lgc_orders.c.client_order_id == o.c.client_order_id,
                                  lgc_orders.c.batch_id == o.c.batch_id, lgc_orders.c.claimed_by == owner)
    conn.execute(sa.update(o).where(o.c.outcome == OutboxState.PENDING, held_here)
                 .values(last_error=error, updated_at=now))


# ---- key rotation -----------------------------------------------------------------------------------

def reseal_bodies(conn: Connection, vault: Vault) -> int:
    """Every body still waiting encrypted again with the vault's first key (plain ones too), in
    the caller's transaction (`labsync db rotate-key`); how many."""
    waiting = conn.execute(sa.select(o.c.id, o.c.body).where(o.c.body.is_not(None))).all()
    for row_id, body in waiting:
        conn.execute(sa.update(o).where(o.c.id == row_id).values(body=vault.reseal(body)))
    return len(waiting)


def purge_settled_bodies(conn: Connection, cutoff: datetime, *, dry_run: bool = False) -> list[int]:
    """Retention (etl.retention): drop the bodies of settled rows last written before `cutoff`
    (normally dropped at once when they settle; this catches rows an older labsync kept). Rows
    that may still go out (queued, pending, failed, unconfirmed, given up) keep theirs. Returns
    the rows' ids (emptied unless `dry_run`)."""
    where = sa.and_(o.c.outcome.in_([str(s) for s in SETTLED_OUTBOX_STATES]), o.c.updated_at < cutoff,
                    o.c.body.is_not(None))
    ids = [int(i) for i in conn.execute(sa.select(o.c.id).where(where).order_by(o.c.id)).scalars()]
    if ids and not dry_run:
        conn.execute(sa.update(o).where(o.c.id.in_(ids), where).values(body=None))
    return ids
