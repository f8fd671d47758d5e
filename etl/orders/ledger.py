"""The `lgc_orders` ledger: one row per clientOrderId saying what LetsGetChecked made of it.

The ledger is the authority that keeps an order from being sent twice, across batches, runs,
workers and retries. Rows to send come from the outbox (etl.orders.outbox); each outbox row's own
result is written back there in the same transaction as the ledger's, through the outbox's
functions that take this module's `conn` (the outbox module is the one writer of `lgc_outbox`,
this one of `lgc_orders`).

Life of a ledger row:

    (absent) --claim--> pending --record--> accepted | rejected | conflict | failed
    failed / pending (claim free, lapsed or our own) --claim--> pending --record--> ...

`claim` writes `pending` *before* anything is sent, so a crash always leaves a trace. A row is
sent only by the owner in `claimed_by` (etl.claims: an Airflow task instance or a CLI run; never
a hostname or a PID), whose lease `claimed_until` a heartbeat renews while it works. A claim is
taken when the row is unclaimed, its lease has lapsed, or it is already ours (a retry of the
same task instance takes its rows over at once). Claiming is set-based, one transaction per
window of rows: new clientOrderIds with one INSERT .. ON CONFLICT DO NOTHING RETURNING; existing
ones read with `FOR UPDATE SKIP LOCKED` on PostgreSQL (a row another loader is claiming this very
moment is `busy`, never waited for), under SQLite's single write lock otherwise.

What a window's rows become:
- new clientOrderId, or `pending`/`failed` and claimable: sent (`send`);
- held by another live owner: `busy`, not sent; the outbox row stays unsettled and a later run
  (or `labsync retry`) settles it;
- `accepted` with the same payload: not sent; the outbox row is `accepted` when the ledger's
  outcome is this very batch's (its outbox write was lost), else `already_settled`;
- `accepted` with a *different* payload: not sent, outbox row `conflict` naming both batches and
  lines. The ledger keeps `accepted` and the order-item ids of the order LetsGetChecked holds;
- `conflict` (a 409): not sent, outbox row `conflict`;
- `rejected` with the same payload: not sent (`already_settled`, or `rejected` for the same
  batch); with a different payload (a corrected row in a later batch): sent again, since
  LetsGetChecked never created that order.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine, bindparam
from sqlalchemy.dialects import postgresql, sqlite

from etl.claims import aware
from etl.claims import now as _now
from etl.lgc.client import ACCEPTED, CONFLICT, FAILED, PENDING, REJECTED, UNCONFIRMED, Outcome
from etl.orders import outbox
from etl.orders.outbox import Prepared
from etl.states import SETTLED_OUTBOX_STATES, OrderState, OutboxState
from etl.warehouse.tables import JSONType, batch_files, lgc_orders

t = lgc_orders

SEND, SKIP, BUSY = "send", "skip", "busy"
DEFAULT_LEASE = timedelta(seconds=60)


@dataclass(frozen=True)
class Decision:
    item: Prepared
    action: str  # send | skip | busy
    state: str | None = None  # for skip: the outbox row's outcome
    note: str | None = None
    http_status: int | None = None


def _insert(conn: sa.Connection):
    return postgresql.insert(t) if conn.dialect.name == "postgresql" else sqlite.insert(t)


def claim(
    engine: Engine,
    items: Sequence[Prepared],
    *,
    owner: str,
    lease: timedelta = DEFAULT_LEASE,
    now: datetime | None = None,
) -> list[Decision]:
    """Claim the ledger rows of `items` for `owner` and decide, per item, whether it is sent.

    One transaction: new rows are inserted `pending`, existing ones claimed where allowed, and
    the outbox rows updated to match (`pending` for rows to send, their final outcome for rows
    that need no sending). Items are handled in clientOrderId order, so two loaders claiming
    overlapping windows never deadlock."""
    if not items:
        return []
    now = now or _now()
    until = now + lease
    by_coid = {i.client_order_id: i for i in items}
    coids = sorted(by_coid)
    decisions: dict[str, Decision] = {}
    with engine.begin() as conn:
        inserted = set(
            conn.execute(
                _insert(conn).on_conflict_do_nothing(index_elements=["client_order_id"]).returning(t.c.client_order_id),
                [
                    dict(client_order_id=c, batch_id=by_coid[c].batch_id, line=by_coid[c].line,
                         state=PENDING, attempts=0, payload_sha256=by_coid[c].sha256,
                         created_at=now, updated_at=now, claimed_by=owner, claimed_until=until)
                    for c in coids
                ],
            ).scalars()
        )
        for c in inserted:
            decisions[c] = Decision(by_coid[c], SEND)
        rest = [c for c in coids if c not in inserted]
        if rest:
            q = sa.select(
                t.c.client_order_id, t.c.state, t.c.payload_sha256, t.c.claimed_by,
                t.c.claimed_until, t.c.batch_id, t.c.line, t.c.http_status,
            ).where(t.c.client_order_id.in_(rest)).order_by(t.c.client_order_id)
            if conn.dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)
            rows = {r.client_order_id: r for r in conn.execute(q)}
            takes = []
            for c in rest:
                row = rows.get(c)
                if row is None:  # locked by a loader claiming or recording it right now
                    decisions[c] = Decision(by_coid[c], BUSY, None, "being sent by another run")
                    continue
                d = _decide(by_coid[c], row, owner=owner, now=now)
                decisions[c] = d
                if d.action == SEND:
                    takes.append(dict(k_coid=c, k_state=row.state, v_batch=by_coid[c].batch_id,
                                      v_line=by_coid[c].line, v_sha=by_coid[c].sha256))
            if takes:
                conn.execute(_take.values(claimed_by=owner, claimed_until=until, updated_at=now), takes)
        _mark_outbox(conn, decisions.values(), now)
    return [decisions[i.client_order_id] for i in items]


_take = (
    sa.update(t)
    .where(t.c.client_order_id == bindparam("k_coid"), t.c.state == bindparam("k_state"))
    .values(state=PENDING, batch_id=bindparam("v_batch"), line=bindparam("v_line"),
            payload_sha256=bindparam("v_sha"))
)


def _where(row) -> str:
    return f"batch {row.batch_id}, line {row.line}"


def _decide(item: Prepared, row, *, owner: str, now: datetime) -> Decision:
    same = row.payload_sha256 == item.sha256
    ours = row.batch_id == item.batch_id  # the ledger's outcome is this very batch's
    if row.state == ACCEPTED and same:
        if ours:
            return Decision(item, SKIP, OutboxState.ACCEPTED, None, row.http_status)
        return Decision(item, SKIP, OutboxState.ALREADY_SETTLED,
                        f"already accepted ({_where(row)}); not sent again", row.http_status)
    if row.state == ACCEPTED:
        return Decision(item, SKIP, OutboxState.CONFLICT,
                        f"already accepted ({_where(row)}) with a different payload; this one "
                        f"(batch {item.batch_id}, line {item.line}) was not sent")
    if row.state == CONFLICT:
        if ours and same:
            return Decision(item, SKIP, OutboxState.CONFLICT, None, row.http_status)
        return Decision(item, SKIP, OutboxState.CONFLICT,
                        f"already a conflict at LetsGetChecked ({_where(row)}); not sent")
    if row.state == REJECTED and same:
        if ours:
            return Decision(item, SKIP, OutboxState.REJECTED, None, row.http_status)
        return Decision(item, SKIP, OutboxState.ALREADY_SETTLED,
                        f"already rejected by LetsGetChecked ({_where(row)}) with this same data; "
                        "not sent again: fix the row and drop it in a new file", row.http_status)
    # pending / failed (or any other unsettled state), or rejected with a corrected payload
    lapsed = (aware(row.claimed_until) or now) < now
    if row.claimed_by is None or row.claimed_by == owner or lapsed:
        return Decision(item, SEND)
    return Decision(item, BUSY, None, "being sent by another run")


def _mark_outbox(conn: sa.Connection, decisions: Iterable[Decision], now: datetime) -> None:
    """Outbox rows follow the claim: `pending` for rows to send, the outcome for settled ones
    (in id order, so concurrent transactions lock them in the same order)."""
    decisions = sorted(decisions, key=lambda d: d.item.outbox_id)
    sending = [d.item.outbox_id for d in decisions if d.action == SEND]
    if sending:
        outbox.mark_pending(conn, sending, now)
    settled = [
        dict(k_id=d.item.outbox_id, v_outcome=d.state, v_error=d.note, v_status=d.http_status)
        for d in decisions if d.action == SKIP
    ]
    if settled:
        outbox.mark_settled(conn, settled, now)


@dataclass(frozen=True)
class Result:
    """One row's outcome for `record`. `sent`: the PUT went out (counts as an attempt)."""

    item: Prepared
    outcome: Outcome
    sent: bool


_record_ledger = (
    sa.update(t)
    .where(t.c.client_order_id == bindparam("k_coid"), t.c.claimed_by == bindparam("k_owner"))
    .values(
        state=bindparam("v_state"),
        http_status=bindparam("v_status"),
        order_item_ids=bindparam("v_items", type_=JSONType),
        attempts=t.c.attempts + bindparam("v_attempts"),
        last_error=bindparam("v_error"),
        updated_at=bindparam("v_now"),
        claimed_by=None,
        claimed_until=None,
    )
)


def outbox_outcome(state: str, tries: int, max_attempts: int) -> str:
    """The outbox outcome for a ledger outcome: `failed` becomes `given_up` once the row has been
    sent `max_attempts` times. A ledger state the outbox does not name (one added later, not
    settled) counts as `failed` here, so the row goes out again instead of being stranded."""
    if state not in OutboxState.__members__.values():
        state = FAILED
    if state in (FAILED, UNCONFIRMED) and tries >= max_attempts:
        return OutboxState.GIVEN_UP
    return state


def record(
    engine: Engine,
    results: Iterable[Result],
    *,
    owner: str,
    max_attempts: int,
    now: datetime | None = None,
) -> int:
    """Store outcomes in the outbox and the ledger (one transaction, executemany) and release
    this owner's claims. A row whose claim was taken over meanwhile (our lease lapsed) is left
    to the new owner, in both tables. Returns the ledger rows written."""
    now = now or _now()
    ledger_params: list[dict[str, Any]] = []
    settled: list[dict[str, Any]] = []
    open_: list[dict[str, Any]] = []
    for r in results:
        out, item = r.outcome, r.item
        tries = item.attempts + (1 if r.sent else 0)
        outcome = outbox_outcome(out.state, tries, max_attempts)
        row = dict(k_id=item.outbox_id, k_coid=item.client_order_id, k_owner=owner, v_outcome=outcome,
                   v_status=out.http_status, v_tries=tries, v_error=out.error, v_now=now)
        (settled if outcome in SETTLED_OUTBOX_STATES else open_).append(row)
        ledger_params.append(dict(k_coid=item.client_order_id, k_owner=owner, v_state=out.state,
                                  v_status=out.http_status, v_items=out.order_item_ids,
                                  v_attempts=out.attempts, v_error=out.error, v_now=now))
    if not ledger_params:
        return 0
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # lock our ledger rows first, in clientOrderId order, as `claim` does: the two never
            # wait on each other in opposite orders
            conn.execute(sa.select(t.c.client_order_id)
                         .where(t.c.client_order_id.in_(sorted(p["k_coid"] for p in ledger_params)),
                                t.c.claimed_by == owner)
                         .order_by(t.c.client_order_id).with_for_update())
        outbox.record_results(conn, settled, open_)  # the outbox's prebuilt statements, executemany
        return conn.execute(_record_ledger, ledger_params).rowcount


CONFIRMED_BY_GET = ("confirmed by GET order: LetsGetChecked holds it (the PUT's own answer was not "
                    "conclusive)")


def confirm(engine: Engine, client_order_id: str, order_item_ids: Sequence[Mapping[str, Any]], *,
            now: datetime | None = None) -> bool:
    """An `unconfirmed` order that LetsGetChecked's GET shows it holds becomes `accepted`, with
    its order-item ids; so do the outbox rows that sent this body and were left `unconfirmed`
    (their PHI body goes: settled). A row some loader holds right now is left to it (its PUT
    decides). Returns whether the ledger row was confirmed."""
    now = now or _now()
    with engine.begin() as conn:
        sha = conn.execute(
            sa.update(t)
            .where(t.c.client_order_id == client_order_id, t.c.state == OrderState.UNCONFIRMED,
                   t.c.claimed_by.is_(None))
            .values(state=OrderState.ACCEPTED, order_item_ids=list(order_item_ids),
                    last_error=CONFIRMED_BY_GET, updated_at=now)
            .returning(t.c.payload_sha256)
        ).scalar_one_or_none()
        if sha is None:
            return False
        outbox.confirm_accepted(conn, client_order_id, sha, note=CONFIRMED_BY_GET, now=now)
        return True


def mark_tracked(engine: Engine, client_order_ids: Sequence[str], *, now: datetime | None = None) -> int:
    """Orders a GET answered listing their items: `tracked_at` is set (once), so the sweep stops
    asking about them as never described (etl.orders.lifecycle.open_orders); from then on their
    open items say when they are due. Returns how many rows were marked."""
    ids = sorted(set(client_order_ids))
    if not ids:
        return 0
    now = now or _now()
    marked = 0
    with engine.begin() as conn:
        for i in range(0, len(ids), 500):
            marked += conn.execute(
                sa.update(t).where(t.c.client_order_id.in_(ids[i:i + 500]), t.c.tracked_at.is_(None))
                .values(tracked_at=now)).rowcount
    return marked


def release(engine: Engine, items: Iterable[Prepared], *, owner: str, error: str, max_attempts: int) -> int:
    """Claimed but never sent (the batch stopped, the run was interrupted): `failed` with the
    true reason, claim released, no attempt counted; a later run sends them."""
    return record(engine, (Result(i, Outcome(FAILED, None, attempts=0, error=error), False) for i in items),
                  owner=owner, max_attempts=max_attempts)


def unclaim_all(engine: Engine, *, owner: str, error: str) -> int:
    """Drop every claim `owner` still holds: rows whose outcome is unknown (cancelled mid-request,
    or claimed by a statement that finished after an interruption). They stay `pending` with a
    true reason in the outbox and go out again on the next run without waiting for the lease."""
    with engine.begin() as conn:
        outbox.note_unclaimed(conn, owner=owner, error=error, now=_now())
        return conn.execute(sa.update(t).where(t.c.claimed_by == owner)
                            .values(claimed_by=None, claimed_until=None)).rowcount


def lookup(engine: Engine, client_order_ids: Sequence[str]) -> dict[str, Any]:
    """Current state and payload hash per clientOrderId (read only; for --dry-run)."""
    if not client_order_ids:
        return {}
    with engine.connect() as conn:
        return {
            r.client_order_id: r
            for r in conn.execute(
                sa.select(t.c.client_order_id, t.c.state, t.c.payload_sha256).where(
                    t.c.client_order_id.in_(list(client_order_ids))
                )
            )
        }


def would_send(row, sha256: str) -> bool:
    """The dry-run twin of `claim`'s decision (ignoring claims by live runs)."""
    if row is None or row.state in (PENDING, FAILED, UNCONFIRMED):  # unconfirmed: like failed
        return True
    if row.state in (ACCEPTED, CONFLICT):
        return False
    return row.state != REJECTED or row.payload_sha256 != sha256


STATUS_COLUMNS = (
    "client_order_id", "batch_id", "batch", "line", "state", "http_status", "order_item_ids",
    "attempts", "last_error", "payload_sha256", "created_at", "updated_at",
)


def find_batch_ids(engine: Engine, name: str) -> list[int]:
    """Batch ids whose file name (or base name, or id) is `name`. Read through the indexes on
    `batch_files.file_name` and the id (`find_batch_ids_query`), never every batch; only a name
    that matches neither is looked for as the base name of a stored path (a file name with a
    folder: batches of rows from no file), which reads the batches' names."""
    with engine.connect() as conn:
        ids = [int(i) for i in conn.execute(find_batch_ids_query(name)).scalars()]
        if ids or "/" in name:
            return ids
        rows = conn.execute(sa.select(batch_files.c.id, batch_files.c.file_name)
                            .where(batch_files.c.file_name.like(f"%/{name}"))).all()
    return [r.id for r in rows if os.path.basename(r.file_name or "") == name]


def find_batch_ids_query(name: str) -> sa.Select:
    """The indexed lookup of `find_batch_ids`: the file name as stored, or the batch's id."""
    b = batch_files
    named = b.c.file_name == name
    if name.isdigit() and len(name) < 19:
        named = sa.or_(named, b.c.id == int(name))
    return sa.select(b.c.id).where(named).order_by(b.c.id)


def status_rows(
    engine: Engine,
    *,
    client_order_id: str | None = None,
    batch_ids: Sequence[int] | None = None,
    limit: int | None = None,
) -> list[dict]:
    """Ledger rows (oldest first) as plain dicts, with the batch's file name."""
    q = (
        sa.select(
            t.c.client_order_id, t.c.batch_id, batch_files.c.file_name.label("batch"), t.c.line,
            t.c.state, t.c.http_status, t.c.order_item_ids, t.c.attempts, t.c.last_error,
            t.c.payload_sha256, t.c.created_at, t.c.updated_at,
        )
        .select_from(t.outerjoin(batch_files, t.c.batch_id == batch_files.c.id))
        .order_by(t.c.batch_id, t.c.line, t.c.client_order_id)
    )
    if client_order_id is not None:
        q = q.where(t.c.client_order_id == client_order_id)
    if batch_ids is not None:
        q = q.where(t.c.batch_id.in_(list(batch_ids)))
    if limit:
        q = q.limit(limit)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def state_counts(engine: Engine, *, batch_ids: Sequence[int] | None = None) -> dict[str, int]:
    q = sa.select(t.c.state, sa.func.count()).group_by(t.c.state)
    if batch_ids is not None:
        q = q.where(t.c.batch_id.in_(list(batch_ids)))
    with engine.connect() as conn:
        return {state: n for state, n in conn.execute(q)}
