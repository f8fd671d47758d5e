"""The `lgc_orders` ledger: one row per clientOrderId saying what happened to it.

Life of a row:

    (absent) --claim--> pending --record--> accepted | rejected | conflict | failed
    failed/pending (unclaimed or its claimer is gone) --claim--> pending --record--> ...

`claim` writes `pending` *before* anything is sent, so a crash always leaves a trace, and it is
the concurrency guard between loaders running at the same time (CLI runs, parallel Airflow
tasks, other hosts): a row is sent only by the run whose id is in `claimed_by`. Taking a claim is
a single conditional statement (INSERT .. ON CONFLICT DO NOTHING, or UPDATE .. WHERE the row is
still as we saw it), so of two runs racing for one row exactly one wins; the other reports the
row as `busy` and does not send it.

A claim is released when the outcome is recorded. If its run died, the claim is taken over when
- the claim's lease (`claimed_until`) has passed, or
- the claimer ran on this host and its process no longer exists (a killed CLI run is picked up
  by the next run at once, without waiting for the lease).

What a run does with each row it reads:
- new clientOrderId, or `pending`/`failed` and claimable: send it;
- `pending`/`failed` claimed by another live run: `busy`, not sent (that run will finish it);
- `accepted` with the same payload: skipped; with a *different* payload: flagged `conflict`
  locally, not sent (LetsGetChecked keeps the first order; the ledger keeps its order-item ids);
- `conflict`: skipped;
- `rejected` with the same payload: skipped; with a different payload (a corrected row in a
  later batch): sent again, since LetsGetChecked never created that order.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine, bindparam
from sqlalchemy.dialects import postgresql, sqlite

from etl.lgc.client import ACCEPTED, CONFLICT, FAILED, PENDING, REJECTED, UNCONFIRMED, Outcome
from etl.warehouse.tables import JSONType, batch_files, lgc_orders

t = lgc_orders

SEND, SKIP, BUSY = "send", "skip", "busy"
DEFAULT_LEASE = timedelta(minutes=10)


@dataclass(frozen=True)
class Prepared:
    """One row ready to go: its id, where it came from, its body and the body's hash.
    `body` is None when the row could not be mapped (`error` says why; it is then rejected
    locally without sending)."""

    client_order_id: str
    line: int | None
    body: dict | None
    content: bytes
    sha256: str
    error: str | None = None


@dataclass(frozen=True)
class Decision:
    item: Prepared
    action: str  # send | skip | busy
    state: str | None = None  # for skip: the row's terminal state
    note: str | None = None


def new_run_id() -> str:
    """`host:pid:nonce`: unique per run, and lets a later run on the same host see that the
    claimer's process is gone."""
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def _claimer_is_dead(claimed_by: str | None) -> bool:
    if not claimed_by:
        return True
    host, _, rest = claimed_by.partition(":")
    pid_s, _, _nonce = rest.partition(":")
    if host != socket.gethostname()[:60] or not pid_s.isdigit():
        return False  # another host: only the lease can tell
    pid = int(pid_s)
    if pid == os.getpid():
        return False  # another run in this very process is live by definition
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _aware(ts: datetime | None) -> datetime | None:
    if ts is not None and ts.tzinfo is None:  # SQLite hands back naive datetimes
        return ts.replace(tzinfo=UTC)
    return ts


def _insert(conn: sa.Connection):
    return (postgresql.insert(t) if conn.dialect.name == "postgresql" else sqlite.insert(t))


def claim(
    engine: Engine,
    items: Sequence[Prepared],
    *,
    run: str,
    batch_id: int | None,
    lease: timedelta = DEFAULT_LEASE,
    now: datetime | None = None,
) -> list[Decision]:
    """Write `pending` rows for `items` and decide, per item, whether this run sends it.
    One transaction; the INSERT comes first so SQLite takes its write lock before reading."""
    if not items:
        return []
    now = now or datetime.now(UTC)
    until = now + lease
    coids = [i.client_order_id for i in items]
    with engine.begin() as conn:
        conn.execute(
            _insert(conn).on_conflict_do_nothing(index_elements=["client_order_id"]),
            [
                dict(
                    client_order_id=i.client_order_id, batch_id=batch_id, line=i.line,
                    state=PENDING, attempts=0, payload_sha256=i.sha256,
                    created_at=now, updated_at=now, claimed_by=run, claimed_until=until,
                )
                for i in items
            ],
        )
        rows = {
            r.client_order_id: r
            for r in conn.execute(
                sa.select(
                    t.c.client_order_id, t.c.state, t.c.payload_sha256, t.c.claimed_by,
                    t.c.claimed_until, t.c.batch_id, t.c.line,
                ).where(t.c.client_order_id.in_(coids))
            )
        }
        decisions: list[Decision] = []
        for item in items:
            row = rows[item.client_order_id]
            decisions.append(_decide(conn, item, row, run=run, batch_id=batch_id, now=now, until=until))
    return decisions


def _decide(conn, item: Prepared, row, *, run, batch_id, now, until) -> Decision:
    if row.claimed_by == run and row.state == PENDING:
        return Decision(item, SEND)  # inserted just now by this run
    same = row.payload_sha256 == item.sha256
    if row.state == ACCEPTED and same:
        return Decision(item, SKIP, ACCEPTED, "already accepted")
    if row.state == ACCEPTED:
        note = (
            f"already accepted (batch {row.batch_id}, line {row.line}) with a different payload; "
            f"this one (batch {batch_id}, line {item.line}) was not sent"
        )
        done = conn.execute(
            sa.update(t)
            .where(t.c.client_order_id == item.client_order_id, t.c.state == ACCEPTED,
                   t.c.payload_sha256 == row.payload_sha256)
            .values(state=CONFLICT, http_status=None, last_error=note, batch_id=batch_id,
                    line=item.line, updated_at=now)
        ).rowcount
        return Decision(item, SKIP, CONFLICT, note) if done else Decision(item, BUSY)
    if row.state == CONFLICT:
        return Decision(item, SKIP, CONFLICT, "already a conflict")
    if row.state == REJECTED and same:
        return Decision(item, SKIP, REJECTED, "already rejected")

    # pending / failed (or rejected with a corrected payload): take it if nobody live holds it
    claimable = (
        row.claimed_by is None
        or (_aware(row.claimed_until) or now) < now
        or _claimer_is_dead(row.claimed_by)
    )
    if not claimable:
        return Decision(item, BUSY, None, "being sent by another run")
    guard = t.c.claimed_by.is_(None) if row.claimed_by is None else t.c.claimed_by == row.claimed_by
    done = conn.execute(
        sa.update(t)
        .where(t.c.client_order_id == item.client_order_id, t.c.state == row.state, guard)
        .values(state=PENDING, claimed_by=run, claimed_until=until, batch_id=batch_id,
                line=item.line, payload_sha256=item.sha256, updated_at=now)
    ).rowcount
    return Decision(item, SEND) if done else Decision(item, BUSY, None, "being sent by another run")


_record = (
    sa.update(t)
    .where(t.c.client_order_id == bindparam("k_coid"), t.c.claimed_by == bindparam("k_run"))
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


def record(
    engine: Engine, results: Iterable[tuple[str, Outcome]], *, run: str, now: datetime | None = None
) -> int:
    """Store outcomes (one executemany) and release this run's claims. Returns rows written.
    A row whose claim was taken over by another run is left to that run."""
    now = now or datetime.now(UTC)
    params = [
        dict(k_coid=coid, k_run=run, v_state=o.state, v_status=o.http_status,
             v_items=o.order_item_ids, v_attempts=o.attempts, v_error=o.error, v_now=now)
        for coid, o in results
    ]
    if not params:
        return 0
    with engine.begin() as conn:
        return conn.execute(_record, params).rowcount


def release(engine: Engine, client_order_ids: Iterable[str], *, run: str, error: str) -> int:
    """Claimed but never sent (the batch stopped): mark `failed` so the next run sends them."""
    return record(engine, ((c, Outcome(FAILED, None, attempts=0, error=error)) for c in client_order_ids), run=run)


def unclaim(engine: Engine, client_order_ids: Sequence[str], *, run: str) -> None:
    """Drop this run's claim on rows whose outcome is unknown (left `pending`): the next run
    sends them again without waiting for the lease."""
    if not client_order_ids:
        return
    with engine.begin() as conn:
        conn.execute(
            sa.update(t)
            .where(t.c.client_order_id.in_(list(client_order_ids)), t.c.claimed_by == run)
            .values(claimed_by=None, claimed_until=None)
        )


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
    return row.state == REJECTED and row.payload_sha256 != sha256


STATUS_COLUMNS = (
    "client_order_id", "batch_id", "batch", "line", "state", "http_status", "order_item_ids",
    "attempts", "last_error", "payload_sha256", "created_at", "updated_at",
)


def find_batch_ids(engine: Engine, name: str) -> list[int]:
    """Batch ids whose file name (or base name, or id) is `name`."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(batch_files.c.id, batch_files.c.file_name)).all()
    return [
        r.id for r in rows
        if name in (r.file_name, os.path.basename(r.file_name or ""), str(r.id))
    ]


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
