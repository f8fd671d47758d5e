"""After the PUT: what became of each order item at LetsGetChecked, kept in the warehouse.

    track(engine, settings, client_order_ids=None, batch=None, stale_after=None) -> TrackSummary
        GET every open order (accepted or conflict in the ledger, with an item not yet in a final
        state, or never looked at), or the ones named; upsert `lgc_order_items`, append
        `lgc_item_status_history`. With `stale_after` (seconds) only orders not checked for that
        long: the sweep that catches webhooks LetsGetChecked gave up on.
    apply_webhooks(engine, settings) -> WebhookSummary
        the `lgc` events the receiver stored (etl.webhooks) are hints: each names an order (or a
        barcode) to GET, and what is stored is what that GET returned. An authenticated event's
        item status is then recorded in the history (source `webhook`, never the current status),
        and only for an item the GET listed.
    cancel(engine, settings, client_order_id, item=None) -> CancelReport
        refresh the order, refuse locally from KitArrivedAtLab on, PATCH the rest and mark them
        `cancel requested` until a status confirms (or overtakes) it.
    item_statuses(engine, client_order_ids) -> {clientOrderId: [item dicts]}   (status, summary)

**Ordering rule** (`apply_observations`): notifications come at least once and out of order, so
every observation carries the vendor's timestamp and the newest one wins; a webhook no newer than
the status held is recorded in the history (`applied` false) but changes nothing. A poll (our own
GET) is LetsGetChecked's answer now: it always settles a conflict with a webhook, and loses only
to a newer poll (two trackers whose answers cross). Each batch of observations is decided and
written in one transaction with the items' rows locked (SQLite: the write lock, taken by an
INSERT first; PostgreSQL: SELECT … FOR UPDATE in item order), so concurrent trackers, the DAG
and a CLI run never overwrite a newer status with an older one.

The history has one row per status change (and one per out-of-order status the item never held),
with its source (`poll` or `webhook`), the vendor's timestamp and the item's previous status.

**Events are hints.** An event's status is never written before, or instead of, the confirming
GET: a forged event cannot create an item (the GET does not list it), nor set a status (the GET's
answer is the status); an item held here that the order's GET no longer lists becomes `NotListed`
(labsync's own marker, final). Webhook `callbackURL`s are never fetched: the order is confirmed
with our own GET, built from the clientOrderId against the configured LGC_BASE_URL, so a forged
event can cost one GET and nothing else. Logs name clientOrderIds and item ids only.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.dialects import postgresql, sqlite

from etl.errors import ApiError, UnusableInputError
from etl.lgc.orders_api import (
    LgcOrder,
    get_field,
    open_session,
    parse_time,
    status_code,
    text_of,
)
from etl.orders import ledger
from etl.settings import Settings
from etl.states import (
    CANCELLABLE_ITEM_STATUSES,
    FINAL_ITEM_STATUSES,
    TRACKED_ORDER_STATES,
    CancelState,
    ItemStatus,
    OrderState,
    StatusSource,
    WebhookEventState,
)
from etl.warehouse.tables import OPEN_ITEM_SQL, lgc_item_status_history, lgc_order_items, lgc_orders
from etl.webhooks import store

log = logging.getLogger(__name__)

items_t, history_t = lgc_order_items, lgc_item_status_history
WRITE_EVERY = 200  # orders per warehouse transaction while tracking
# an open item, as literal SQL: the predicate of the partial index the sweep reads
# (tables.OPEN_ITEM_SQL; a bound parameter in its place would not match it)
_OPEN_SQL = sa.text(f"({OPEN_ITEM_SQL})")


def _aware(ts: datetime | None) -> datetime | None:
    if ts is not None and ts.tzinfo is None:  # SQLite hands back naive datetimes (stored as UTC)
        return ts.replace(tzinfo=UTC)
    return ts


# ---- observations and the ordering rule --------------------------------------------------------

@dataclass(frozen=True)
class Observation:
    """One item's status as a poll or a webhook reported it."""

    item_id: str
    client_order_id: str
    status: str | None
    at: datetime | None  # the vendor's timestamp (webhook `timestamp`, item `updatedAt`)
    source: StatusSource
    details: Mapping[str, Any] | None = None  # poll: code, barcode, tracking, ... (column names)
    checked_at: datetime | None = None  # poll: when the answer arrived
    webhook_event_id: int | None = None
    record_only: bool = False  # history only, never the current status (a webhook's, after its GET)


def poll_observations(order: LgcOrder) -> list[Observation]:
    """A GET answer as observations: one per item, timestamped by its updatedAt (else the time
    of the answer), carrying every detail the answer had."""
    out = []
    for item in order.items:
        details = dict(code=item.code, barcode=item.barcode, alpha_code=item.alpha_code,
                       outbound_tracking=item.outbound_tracking, inbound_tracking=item.inbound_tracking,
                       replacement_item_id=item.replacement_item_id,
                       vendor_created_at=item.created_at, vendor_updated_at=item.updated_at)
        out.append(Observation(item.item_id, order.client_order_id, item.status,
                               item.updated_at or order.fetched_at, StatusSource.POLL,
                               details, order.fetched_at))
    return out


def _wins(current: Mapping[str, Any], obs: Observation) -> bool:
    """The ordering rule: does `obs` replace the item's current status?"""
    if obs.status is None or obs.record_only:
        return False
    if current["status"] is None:
        return True
    held_at = _aware(current["status_at"])
    if obs.source == StatusSource.POLL:
        if current["status_source"] != StatusSource.POLL or held_at is None or obs.at is None:
            return True  # a poll settles any conflict with a webhook
        return obs.at >= held_at  # two polls: the newer answer
    if obs.at is None:
        return False  # an undated webhook cannot be ordered against what we hold
    return held_at is None or obs.at > held_at


def _cancel_after(cancel_state: str | None, status: str | None) -> str | None:
    """A pending cancel is confirmed by Cancelled, and overtaken by any status past the point
    where LetsGetChecked can still cancel."""
    if cancel_state != CancelState.REQUESTED or status is None:
        return cancel_state
    if status == ItemStatus.CANCELLED:
        return CancelState.CONFIRMED
    if status not in CANCELLABLE_ITEM_STATUSES:
        return CancelState.TOO_LATE
    return cancel_state


@dataclass
class Applied:
    """What `apply_observations` did."""

    changed: int = 0  # items whose status changed
    history: int = 0  # history rows appended
    ignored: int = 0  # observations older than the status held


_ROW_COLUMNS = ("client_order_id", "code", "status", "status_at", "status_source", "barcode",
                "alpha_code", "outbound_tracking", "inbound_tracking", "replacement_item_id",
                "vendor_created_at", "vendor_updated_at", "last_checked_at", "cancel_state")
_update_item = (
    sa.update(items_t)
    .where(items_t.c.item_id == sa.bindparam("k_item"))
    .values(updated_at=sa.bindparam("v_now"), **{c: sa.bindparam(f"v_{c}") for c in _ROW_COLUMNS})
)


def _insert(conn: sa.Connection, table: sa.Table):
    return postgresql.insert(table) if conn.dialect.name == "postgresql" else sqlite.insert(table)


def apply_observations(engine: Engine, observations: Sequence[Observation], *,
                       now: datetime | None = None,
                       listed: Mapping[str, tuple[datetime, frozenset[str]]] | None = None) -> Applied:
    """Merge observations into `lgc_order_items` and the history, in one transaction, by the
    ordering rule. Observations of one item are taken in the order given. `listed`: for orders a
    GET just answered, (when, the item ids it listed): an item of those orders held here that the
    answer did not list becomes `NotListed` (an answer listing no item at all marks nothing)."""
    result = Applied()
    if not observations and not listed:
        return result
    now = now or datetime.now(UTC)
    observations = list(observations)
    ids = sorted({o.item_id for o in observations})
    first_coid: dict[str, str] = {}
    for o in observations:
        first_coid.setdefault(o.item_id, o.client_order_id)
    with engine.begin() as conn:
        # the INSERT first: on SQLite it takes the write lock before anything is read
        if ids:
            conn.execute(
                _insert(conn, items_t).on_conflict_do_nothing(index_elements=["item_id"]),
                [dict(item_id=i, client_order_id=first_coid[i], first_seen_at=now, updated_at=now) for i in ids],
            )
        gone = _not_listed(conn, listed) if listed else []
        if gone:
            observations.extend(gone)
            ids = sorted(set(ids) | {o.item_id for o in gone})
        if not ids:
            return result
        rows = {
            r.item_id: dict(r._mapping)
            for r in conn.execute(
                sa.select(items_t).where(items_t.c.item_id.in_(ids)).order_by(items_t.c.item_id)
                .with_for_update()
            )
        }
        seen = {
            (r.item_id, r.status)
            for r in conn.execute(sa.select(history_t.c.item_id, history_t.c.status)
                                  .where(history_t.c.item_id.in_(ids)))
        }
        history: list[dict] = []
        hinted: dict[tuple[str, str], int] = {}  # (item, status) -> its record-only row in `history`
        touched: set[str] = set()
        for obs in observations:
            row = rows[obs.item_id]
            wins = _wins(row, obs)
            previous = row["status"]
            if obs.source == StatusSource.POLL and obs.checked_at is not None:
                held = _aware(row["last_checked_at"])
                row["last_checked_at"] = obs.checked_at if held is None else max(held, obs.checked_at)
                touched.add(obs.item_id)
            if wins:
                touched.add(obs.item_id)
                row.update(status=obs.status, status_at=obs.at, status_source=obs.source,
                           client_order_id=obs.client_order_id)
                row["cancel_state"] = _cancel_after(row["cancel_state"], obs.status)
                for key, value in (obs.details or {}).items():
                    if value is not None:  # a detail once known is never erased by an answer that lacks it
                        row[key] = value
                if obs.status != previous:
                    result.changed += 1
            elif obs.status is not None:
                result.ignored += 1
            if wins and obs.status is not None and obs.status != previous and (obs.item_id, obs.status) in hinted:
                # an event told it just before this answer confirmed it: one row, now applied
                history[hinted.pop((obs.item_id, obs.status))]["applied"] = True
                continue
            if obs.status is not None and ((wins and obs.status != previous) or (obs.item_id, obs.status) not in seen):
                seen.add((obs.item_id, obs.status))
                if obs.record_only:
                    hinted[(obs.item_id, obs.status)] = len(history)
                history.append(dict(item_id=obs.item_id, client_order_id=obs.client_order_id,
                                    status=obs.status, previous_status=previous, source=str(obs.source),
                                    vendor_timestamp=obs.at, applied=wins,
                                    webhook_event_id=obs.webhook_event_id, recorded_at=now))
        if touched:
            conn.execute(_update_item, [
                {"k_item": i, "v_now": now, **{f"v_{c}": rows[i].get(c) for c in _ROW_COLUMNS}}
                for i in sorted(touched)
            ])
        if history:
            conn.execute(sa.insert(history_t), history)
            result.history = len(history)
    return result


def _not_listed(conn: sa.Connection, listed: Mapping[str, tuple[datetime, frozenset[str]]]) -> list[Observation]:
    """Items held for orders a GET just answered that the answer did not list (and that are not
    marked so yet): a `NotListed` observation each, which settles any status held (a poll's)."""
    coids = [c for c, (_, ids) in listed.items() if ids]
    out: list[Observation] = []
    for i in range(0, len(coids), 500):
        chunk = coids[i:i + 500]
        for item_id, coid in conn.execute(
                sa.select(items_t.c.item_id, items_t.c.client_order_id)
                .where(items_t.c.client_order_id.in_(chunk),
                       sa.or_(items_t.c.status.is_(None), items_t.c.status != ItemStatus.NOT_LISTED))
                .order_by(items_t.c.item_id)):
            when, ids = listed[coid]
            if item_id not in ids:
                out.append(Observation(item_id, coid, ItemStatus.NOT_LISTED, None, StatusSource.POLL,
                                       checked_at=when))
    return out


# ---- which orders to ask about -----------------------------------------------------------------

def open_orders(engine: Engine, *, batch_ids: Sequence[int] | None = None,
                stale_before: datetime | None = None, limit: int | None = None) -> list[str]:
    """clientOrderIds LetsGetChecked holds (ledger `accepted`/`conflict`) that have an item not
    in a final state, or whose items no GET has described yet (`tracked_at` NULL); with
    `stale_before`, only those whose open items were last checked before then (or never).
    Orders left `unconfirmed` (a 2xx to the PUT that was not the documented order) are asked
    about too: the GET settles whether LetsGetChecked holds them.

    It reads the due rows only, however long the history (issue 27), each through its index
    (`open_orders_statements`); the ledger states of the orders the due items name are then
    read by key. Joining the two in SQL would leave the plan to estimates that cannot know that
    open items are the recently checked ones: PostgreSQL then hashes the whole ledger."""
    tracked = [str(s) for s in TRACKED_ORDER_STATES]
    found: set[str] = set()
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":  # as in etl.orders.results.candidates: the due
            # items are estimated as open x checked before the window, as if unrelated, so a
            # long history would start parallel workers to read a handful of rows
            conn.exec_driver_sql("SET LOCAL max_parallel_workers_per_gather = 0")
        if batch_ids is not None:
            found = _open_of_batches(conn, batch_ids, stale_before, tracked)
        else:
            due, *ledger_parts = open_orders_statements(stale_before=stale_before, dialect=engine.dialect.name)
            for stmt in ledger_parts:
                found.update(conn.execute(stmt).scalars())
            named = sorted(set().union(*(conn.execute(stmt).scalars() for stmt in due)) - found)
            for i in range(0, len(named), 500):
                found.update(conn.execute(
                    sa.select(lgc_orders.c.client_order_id)
                    .where(lgc_orders.c.client_order_id.in_(named[i:i + 500]), lgc_orders.c.state.in_(tracked))
                ).scalars())
    out = sorted(found)
    return out[:limit] if limit else out


def _open_of_batches(conn: sa.Connection, batch_ids: Sequence[int], stale_before: datetime | None,
                     tracked: list[str]) -> set[str]:
    """`open_orders` of some batches: their ledger rows (ix_lgc_orders_batch_id), then their
    items by clientOrderId, decided here."""
    o = lgc_orders
    rows = conn.execute(sa.select(o.c.client_order_id, o.c.state, o.c.tracked_at)
                        .where(o.c.batch_id.in_(list(batch_ids)))).all()
    found = {r.client_order_id for r in rows if r.state == OrderState.UNCONFIRMED}
    held = {r.client_order_id: r.tracked_at for r in rows if r.state in tracked}
    final = {str(s) for s in FINAL_ITEM_STATUSES}
    coids = sorted(held)
    with_items: set[str] = set()
    for i in range(0, len(coids), 500):
        for coid, status, checked in conn.execute(
                sa.select(items_t.c.client_order_id, items_t.c.status, items_t.c.last_checked_at)
                .where(items_t.c.client_order_id.in_(coids[i:i + 500]))):
            with_items.add(coid)
            when = _aware(checked)
            if (status is None or status not in final) and (stale_before is None or when is None or when < stale_before):
                found.add(coid)
    found.update(c for c, tracked_at in held.items() if tracked_at is None or c not in with_items)
    return found


def open_orders_statements(*, stale_before: datetime | None = None, dialect: str | None = None) -> list:
    """The statements `open_orders` runs on the whole warehouse (tests/test_scale_plans.py and
    bench/scale.py EXPLAIN them): first a list of the due-item reads (clientOrderIds of open
    items never checked or checked before `stale_before`: ranges of the partial index
    `ix_lgc_order_items_open_checked`), then the ledger's orders no GET described yet
    (`ix_lgc_orders_state_tracked_at`) and its unconfirmed ones (`ix_lgc_orders_state`)."""
    o = lgc_orders
    tracked = [str(s) for s in TRACKED_ORDER_STATES]
    due = sa.select(items_t.c.client_order_id).where(_OPEN_SQL)
    dues = ([due] if stale_before is None else
            [due.where(items_t.c.last_checked_at < stale_before), due.where(items_t.c.last_checked_at.is_(None))])
    return [
        dues,
        _orders_by(dialect, "ix_lgc_orders_state_tracked_at", sa.and_(o.c.state.in_(tracked), o.c.tracked_at.is_(None))),
        _orders_by(dialect, "ix_lgc_orders_state", o.c.state == OrderState.UNCONFIRMED),
    ]


def _orders_by(dialect: str | None, index: str, where: sa.ColumnElement[bool]):
    """clientOrderIds of the ledger rows matching `where`, read through `index`. On SQLite the
    index is named (INDEXED BY): its ANALYZE keeps no histogram, so with nearly every order
    `accepted` it takes an equality on `state` for most of the ledger and would scan it all
    (PostgreSQL's statistics know the rare states are rare). `where` holds only labsync's own
    constants, rendered in place."""
    q = sa.select(lgc_orders.c.client_order_id).where(where)
    if dialect != "sqlite":
        return q
    from sqlalchemy.dialects import sqlite as sqlite_dialect

    sql = str(q.compile(dialect=sqlite_dialect.dialect(), compile_kwargs={"literal_binds": True}))
    sql = sql.replace("FROM lgc_orders", f"FROM lgc_orders INDEXED BY {index}", 1)
    return sa.text(sql).columns(lgc_orders.c.client_order_id)


def _unconfirmed(engine: Engine, coids: Sequence[str]) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.select(lgc_orders.c.client_order_id).where(
            lgc_orders.c.state == OrderState.UNCONFIRMED,
            lgc_orders.c.client_order_id.in_(list(coids)))).scalars())


def item_statuses(engine: Engine, client_order_ids: Iterable[str] | None = None) -> dict[str, list[dict]]:
    """Each order's items (item_id, code, status, status_at, barcode, tracking, cancel_state),
    for `labsync status` and the batch summary. None: every tracked order."""
    q = sa.select(items_t.c.client_order_id, items_t.c.item_id, items_t.c.code, items_t.c.status,
                  items_t.c.status_at, items_t.c.barcode, items_t.c.outbound_tracking,
                  items_t.c.inbound_tracking, items_t.c.cancel_state, items_t.c.last_checked_at)
    out: dict[str, list[dict]] = {}
    wanted = None if client_order_ids is None else list(dict.fromkeys(client_order_ids))
    with engine.connect() as conn:
        chunks = [None] if wanted is None else [wanted[i:i + 500] for i in range(0, len(wanted), 500)]
        for chunk in chunks:
            stmt = q if chunk is None else q.where(items_t.c.client_order_id.in_(chunk))
            for r in conn.execute(stmt.order_by(items_t.c.client_order_id, items_t.c.code, items_t.c.item_id)):
                d = dict(r._mapping)
                d["status_at"], d["last_checked_at"] = _aware(d["status_at"]), _aware(d["last_checked_at"])
                out.setdefault(d.pop("client_order_id"), []).append(d)
    return out


def status_counts(engine: Engine, client_order_ids: Sequence[str] | None = None) -> dict[str, int]:
    """Items per status (`unknown` for items known only by id), optionally for some orders."""
    q = sa.select(items_t.c.status, sa.func.count()).group_by(items_t.c.status)
    counts: Counter = Counter()
    with engine.connect() as conn:
        if client_order_ids is None:
            counts.update({s or "unknown": n for s, n in conn.execute(q)})
        else:
            ids = list(client_order_ids)
            for i in range(0, len(ids), 500):
                for s, n in conn.execute(q.where(items_t.c.client_order_id.in_(ids[i:i + 500]))):
                    counts[s or "unknown"] += n
    return dict(counts)


def describe_items(items: Sequence[Mapping[str, Any]]) -> str:
    """`GLCS KitRegistered, FCIT Cancelled (cancel requested)`: one line for tables and pages."""
    parts = []
    for i in items:
        text = f"{i.get('code') or i.get('item_id')} {i.get('status') or 'unknown'}"
        if i.get("cancel_state") and i["cancel_state"] != CancelState.CONFIRMED:
            text += f" ({i['cancel_state']})"
        parts.append(text)
    return ", ".join(parts)


# ---- tracking (GET every open order) -----------------------------------------------------------

@dataclass
class TrackSummary:
    """What one tracking pass did. `statuses`: items per status of the orders it asked about."""

    orders: int = 0  # orders asked about
    checked: int = 0  # answered with the order
    not_found: list[str] = field(default_factory=list)  # LetsGetChecked answered 404
    confirmed: int = 0  # `unconfirmed` orders the GET showed LetsGetChecked holds: now accepted
    failed: dict[str, str] = field(default_factory=dict)  # clientOrderId -> PHI-free reason
    changed: int = 0  # items whose status changed
    history: int = 0
    requests: int = 0
    hints: int = 0  # event statuses recorded in the history for items the answers listed
    statuses: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if (self.failed or self.not_found) else 0

    def line(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items(), key=_status_order)) or "no items"
        extra = "".join([
            f", {len(self.not_found)} not found" if self.not_found else "",
            f", {self.confirmed} unconfirmed orders confirmed" if self.confirmed else "",
            f", {len(self.failed)} failed" if self.failed else "",
        ])
        return (f"tracked {self.checked} of {self.orders} orders ({self.changed} item statuses "
                f"changed{extra}); items: {counts}")

    def as_dict(self) -> dict:
        return {"orders": self.orders, "checked": self.checked, "not_found": len(self.not_found), "confirmed": self.confirmed,
                "failed": len(self.failed), "changed": self.changed, "history": self.history,
                "requests": self.requests, "statuses": self.statuses, "elapsed": round(self.elapsed, 3)}


def _status_order(kv) -> tuple:
    from etl.states import ITEM_LIFECYCLE

    order = [str(s) for s in ITEM_LIFECYCLE] + [str(ItemStatus.VALIDATION_FAILED), str(ItemStatus.CANCELLED)]
    return (order.index(kv[0]) if kv[0] in order else len(order), kv[0])


def _loop_factory():
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return None
    return uvloop.new_event_loop


def run_async(coro):
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(coro)


def track(engine: Engine, settings: Settings, client_order_ids: Sequence[str] | None = None, *,
          batch_ids: Sequence[int] | None = None, stale_after: float | None = None,
          transport: httpx.AsyncBaseTransport | None = None,
          progress: Callable[[str, str], None] | None = None,
          hints: Mapping[str, Sequence[Observation]] | None = None) -> TrackSummary:
    """GET the named orders, or every open one (see `open_orders`), and merge the answers.
    `progress(client_order_id, outcome)` is called once per order. `hints`: per order, what
    authenticated events said of its items; recorded in the history (never as the current
    status) just before the answer, for the items the answer lists. Raises ConfigError/AuthError
    for settings or credentials; a vendor failure on one order is counted, not raised."""
    return run_async(atrack(engine, settings, client_order_ids, batch_ids=batch_ids, stale_after=stale_after,
                       transport=transport, progress=progress, hints=hints))


async def atrack(engine: Engine, settings: Settings, client_order_ids: Sequence[str] | None = None, *,
                 batch_ids: Sequence[int] | None = None, stale_after: float | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 progress: Callable[[str, str], None] | None = None,
                 hints: Mapping[str, Sequence[Observation]] | None = None) -> TrackSummary:
    started = asyncio.get_running_loop().time()
    summary = TrackSummary()
    if client_order_ids is not None:
        coids = list(dict.fromkeys(client_order_ids))
    else:
        stale_before = datetime.now(UTC) - timedelta(seconds=stale_after) if stale_after is not None else None
        coids = await asyncio.to_thread(open_orders, engine, batch_ids=batch_ids, stale_before=stale_before)
    summary.orders = len(coids)
    if not coids:
        return summary
    unconfirmed = await asyncio.to_thread(_unconfirmed, engine, coids)
    settings.lgc.validated()
    async with open_session(settings, engine=engine, transport=transport) as session:
        pending: list[Observation] = []
        answered: dict[str, tuple[datetime, frozenset[str]]] = {}  # what each answer listed
        flushing = asyncio.Lock()

        async def flush(force: bool = False) -> None:
            nonlocal pending, answered
            async with flushing:
                if not (pending or answered) or (not force and len(pending) < WRITE_EVERY):
                    return
                batch, pending = pending, []
                orders, answered = answered, {}
                done = await asyncio.to_thread(apply_observations, engine, batch, listed=orders)
                summary.changed += done.changed
                summary.history += done.history
                # orders whose items an answer listed leave the sweep's never-described part
                described = sorted(c for c, (_, ids) in orders.items() if ids)
                if described:
                    await asyncio.to_thread(ledger.mark_tracked, engine, described)

        async def one(api, coid: str) -> None:
            order = await api.get_order(coid)
            if order is None:
                summary.not_found.append(coid)
                if coid in unconfirmed:
                    log.warning("order %s: LetsGetChecked does not hold it (HTTP 404): it stays "
                                "unconfirmed and is sent again by the next load", coid)
                else:
                    log.warning("order %s: LetsGetChecked does not know it (HTTP 404)", coid)
                _tell(progress, coid, "not found")
                return
            summary.checked += 1
            if coid in unconfirmed:
                ids = [{"code": i.code, "id": i.item_id} for i in order.items]
                if await asyncio.to_thread(ledger.confirm, engine, coid, ids):
                    summary.confirmed += 1
                    log.info("order %s: confirmed by GET order (was unconfirmed): accepted", coid)
            listed = frozenset(i.item_id for i in order.items)
            told = sorted((replace(o, record_only=True) for o in (hints or {}).get(coid, ()) if o.item_id in listed),
                          key=lambda o: (o.at is None, o.at or order.fetched_at))  # as they happened
            summary.hints += len(told)
            pending.extend(told)
            pending.extend(poll_observations(order))
            answered[coid] = (order.fetched_at, listed)
            _tell(progress, coid, "checked")
            if len(pending) >= WRITE_EVERY:
                await flush()

        def failed(coid: str, exc: ApiError) -> None:
            summary.failed[coid] = str(exc)
            log.warning("order %s: not tracked this time: %s", coid, exc)
            _tell(progress, coid, "failed")

        try:
            await session.for_each(coids, one, failed)
        finally:
            await flush(force=True)  # what was answered is kept, whatever stopped the pass
        summary.requests = session.requests
    summary.statuses = await asyncio.to_thread(status_counts, engine, coids)
    summary.elapsed = asyncio.get_running_loop().time() - started
    log.info("lifecycle: %s", summary.line())
    return summary


def _tell(progress, coid: str, outcome: str) -> None:
    if progress is not None:
        progress(coid, outcome)


# ---- webhooks: apply what the receiver stored, confirm with a GET ------------------------------

@dataclass
class WebhookSummary:
    events: int = 0
    applied: int = 0
    ignored: int = 0
    failed: int = 0
    observations: int = 0  # item statuses the events carried
    track: TrackSummary = field(default_factory=TrackSummary)  # the confirming GETs

    def line(self) -> str:
        return (f"webhooks: {self.events} events, {self.applied} applied, {self.ignored} ignored, "
                f"{self.failed} failed; {self.track.checked} orders confirmed")

    def as_dict(self) -> dict:
        return {"events": self.events, "applied": self.applied, "ignored": self.ignored,
                "failed": self.failed, "observations": self.observations,
                "confirmed": self.track.checked}


@dataclass(frozen=True)
class _Parsed:
    """One stored event, understood: what to apply and which order to confirm."""

    kind: str  # order | result | outreach | ignore | retry
    client_order_id: str | None = None
    observation: Observation | None = None
    reason: str | None = None  # why ignored / failed (PHI-free)


def parse_event(event: store.Event) -> _Parsed:
    """An `lgc` event as LetsGetChecked documents it: `{"type": "order"|"Result"|…, "body": …}`
    (the casing of `type` and of keys varies). Never raises."""

    try:
        doc = event.json()
    except ValueError:
        return _Parsed("ignore", reason="not a JSON document")
    kind = (text_of(get_field(doc, "type"), 40) or "").casefold()
    body = get_field(doc, "body")
    if not isinstance(body, Mapping):
        return _Parsed("ignore", reason=f"event type {kind or 'missing'} without a body")
    when = parse_time(get_field(body, "timestamp"))
    if kind in ("order", "orders"):
        coid = text_of(get_field(body, "clientOrderId"))
        if coid is None:
            return _Parsed("ignore", reason="order event without a clientOrderId")
        ois = get_field(body, "orderItemStatus")
        item_id = text_of(get_field(ois, "id"))
        status = status_code(get_field(ois, "status"))
        obs = None
        if item_id and status:
            obs = Observation(item_id, coid, status, when, StatusSource.WEBHOOK,
                              webhook_event_id=event.id)
        return _Parsed("order", coid, obs)
    if kind in ("result", "results"):
        barcode = text_of(get_field(body, "barcode"), 50)
        if barcode is None:
            return _Parsed("ignore", reason="result event without a barcode")
        return _Parsed("result", barcode, reason=barcode)
    if kind == "outreach":  # a results letter (etl.orders.outreach confirms it with a GET)
        barcode = text_of(get_field(body, "barcode"), 50)
        letter = text_of(get_field(body, "type"), 40)
        if barcode is None or letter is None:
            return _Parsed("ignore", reason="outreach event without a barcode or a letter type")
        return _Parsed("outreach", barcode, reason=letter)
    return _Parsed("ignore", reason=f"event type {kind or 'missing'} is not applied by labsync")


def _known_orders(engine: Engine, coids: Iterable[str]) -> set[str]:
    ids = list(set(coids))
    known: set[str] = set()
    with engine.connect() as conn:
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            known.update(conn.execute(sa.select(lgc_orders.c.client_order_id)
                                      .where(lgc_orders.c.client_order_id.in_(chunk))).scalars())
            known.update(conn.execute(sa.select(items_t.c.client_order_id)
                                      .where(items_t.c.client_order_id.in_(chunk))).scalars())
    return known


def _orders_by_barcode(engine: Engine, barcodes: Iterable[str]) -> dict[str, str]:
    codes = list(set(barcodes))
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(items_t.c.barcode, items_t.c.client_order_id)
                                 .where(items_t.c.barcode.in_(codes))).tuples().all()) if codes else {}


def apply_webhooks(engine: Engine, settings: Settings, *, page: int = 500,
                   transport: httpx.AsyncBaseTransport | None = None) -> WebhookSummary:
    """Apply every stored `lgc` event (received, or failed fewer than
    `lifecycle.max_event_attempts` times), page by page, oldest first:
    order events -> a GET of the order (its answer is stored), then, for an authenticated event
    whose item that answer listed, the event's status in the history;
    result events -> a GET of the order holding that barcode (its results are fetched by
    `etl.orders.results`); other types are marked `ignored`. An event is `applied` once its order
    answered the GET; `failed` (retried next run) when the GET failed or the barcode is not
    known yet."""
    summary = WebhookSummary(track=TrackSummary())
    after = None
    while True:
        events = store.pending_events(engine, "lgc", limit=page, after_id=after,
                                      max_attempts=settings.lifecycle.max_event_attempts)
        if not events:
            break
        after = events[-1].id
        _apply_page(engine, settings, events, summary, transport=transport)
    log.info("lifecycle: %s", summary.line())
    return summary


def _apply_page(engine, settings, events, summary: WebhookSummary, *, transport) -> None:
    """Order events first (their statuses, then one GET per order), then result events: a
    barcode first seen in those GET answers resolves in the same pass."""
    summary.events += len(events)
    parsed = {e.id: parse_event(e) for e in events}
    # an order or result event always names its order or barcode (parse_event)
    known = _known_orders(engine, [p.client_order_id for p in parsed.values()
                                   if p.kind == "order" and p.client_order_id is not None])
    authenticated = {e.id for e in events if e.authenticated}
    outcomes: dict[int, tuple[str, str | None]] = {}
    confirm: dict[int, str] = {}  # event id -> clientOrderId to GET
    observations: list[Observation] = []
    for event_id, p in parsed.items():
        if p.kind == "ignore":
            outcomes[event_id] = (WebhookEventState.IGNORED, p.reason)
        elif p.kind == "order":
            if p.client_order_id is None or p.client_order_id not in known:
                outcomes[event_id] = (WebhookEventState.IGNORED,
                                      f"order {p.client_order_id} is not in the ledger")
                continue
            if p.observation is not None and event_id in authenticated:
                observations.append(p.observation)
            confirm[event_id] = p.client_order_id
    # the GET writes what the items are now (and marks those it no longer lists); what
    # authenticated events said goes into the history just before it, for the items it listed
    hints: dict[str, list[Observation]] = {}
    for o in observations:
        hints.setdefault(o.client_order_id, []).append(o)
    before = summary.track.hints
    answered = _confirm(engine, settings, confirm, outcomes, summary.track, transport=transport, hints=hints)
    summary.observations += summary.track.hints - before

    results = {i: p.client_order_id for i, p in parsed.items()
               if p.kind == "result" and p.client_order_id is not None}
    by_barcode = _orders_by_barcode(engine, results.values())
    confirm = {}
    for event_id, barcode in results.items():
        coid = by_barcode.get(barcode)
        if coid is None:
            outcomes[event_id] = (WebhookEventState.FAILED,
                                  "no tracked item has this barcode yet; retried after the next poll")
        elif coid in answered:  # its order was just fetched
            outcomes[event_id] = answered[coid]
        else:
            confirm[event_id] = coid
    _confirm(engine, settings, confirm, outcomes, summary.track, transport=transport)
    letters = {i: (p.client_order_id, p.reason) for i, p in parsed.items()
               if p.kind == "outreach" and p.client_order_id is not None and p.reason is not None}
    if letters:  # results letters: a GET of each notification, then its PDF (issue 25)
        from etl.orders import outreach

        outcomes.update(outreach.confirm_events(engine, settings, letters, transport=transport))

    store.mark_events(engine, [(i, state, err) for i, (state, err) in outcomes.items()])
    states = Counter(state for state, _ in outcomes.values())
    summary.applied += states[WebhookEventState.APPLIED]
    summary.ignored += states[WebhookEventState.IGNORED]
    summary.failed += states[WebhookEventState.FAILED]


def _confirm(engine, settings, confirm: Mapping[int, str], outcomes: dict, total: TrackSummary, *,
             transport, hints: Mapping[str, Sequence[Observation]] | None = None) -> dict[str, tuple[str, str | None]]:
    """GET each order once; the outcome of every event that named it. Returns the outcome per order."""
    if not confirm:
        return {}
    result = track(engine, settings, sorted(set(confirm.values())), transport=transport, hints=hints)
    total.orders += result.orders
    total.checked += result.checked
    total.not_found += result.not_found
    total.failed.update(result.failed)
    total.changed += result.changed
    total.history += result.history
    total.requests += result.requests
    total.hints += result.hints
    per_order: dict[str, tuple[str, str | None]] = {}
    for coid in set(confirm.values()):
        if coid in result.failed:
            per_order[coid] = (WebhookEventState.FAILED, f"confirming GET failed: {result.failed[coid]}")
        elif coid in result.not_found:
            per_order[coid] = (WebhookEventState.IGNORED, f"LetsGetChecked does not know order {coid} (HTTP 404)")
        else:
            per_order[coid] = (WebhookEventState.APPLIED, None)
    for event_id, coid in confirm.items():
        outcomes[event_id] = per_order[coid]
    return per_order


# ---- cancel -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CancelOutcome:
    item_id: str
    code: str | None
    status: str | None
    outcome: str  # requested | already cancelled | already requested | refused | refused by LetsGetChecked
    message: str


@dataclass
class CancelReport:
    client_order_id: str
    items: list[CancelOutcome] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        ok = {"requested", "already cancelled", "already requested"}
        return 0 if self.items and all(i.outcome in ok for i in self.items) else 1


def cancel(engine: Engine, settings: Settings, client_order_id: str, item: str | None = None, *,
           transport: httpx.AsyncBaseTransport | None = None) -> CancelReport:
    """Cancel one order's items (or the one named by id or code). The order is fetched first so
    the decision uses LetsGetChecked's current status; from KitArrivedAtLab on nothing is sent.
    Raises UnusableInputError when the order or the item does not exist."""
    return run_async(_acancel(engine, settings, client_order_id, item, transport=transport))


async def _acancel(engine, settings: Settings, coid: str, wanted: str | None, *, transport) -> CancelReport:
    body = settings.lifecycle.validated().cancel_patch
    report = CancelReport(coid)
    async with open_session(settings, engine=engine, transport=transport) as session:
        api = await session.api()
        order = await api.get_order(coid)
        if order is None:
            raise UnusableInputError(f"LetsGetChecked does not know order {coid!r}")
        await asyncio.to_thread(apply_observations, engine, poll_observations(order))
        items = (await asyncio.to_thread(item_statuses, engine, [coid])).get(coid, [])
        targets = items
        if wanted is not None:
            targets = [i for i in items if i["item_id"] == wanted] or [
                i for i in items if (i["code"] or "").casefold() == wanted.casefold()]
            if not targets:
                known = ", ".join(f"{i['code']} {i['item_id']}" for i in items) or "none"
                raise UnusableInputError(f"order {coid!r} has no item {wanted!r} (its items: {known})")
            if len(targets) > 1:
                raise UnusableInputError(f"order {coid!r} has {len(targets)} {wanted} items; name one by its id: "
                                         + ", ".join(i["item_id"] for i in targets))
        if not targets:
            raise UnusableInputError(f"order {coid!r} has no items to cancel")
        for it in targets:
            report.items.append(await _cancel_one(engine, api, coid, it, body))
    return report


async def _cancel_one(engine, api, coid: str, it: Mapping[str, Any], body) -> CancelOutcome:
    status, item_id, code = it["status"], it["item_id"], it["code"]

    def out(outcome: str, message: str) -> CancelOutcome:
        log.info("order %s item %s: cancel %s", coid, item_id, outcome)
        return CancelOutcome(item_id, code, status, outcome, message)

    if status == ItemStatus.CANCELLED:
        return out("already cancelled", "already cancelled")
    if status not in CANCELLABLE_ITEM_STATUSES:
        why = ("its kit has reached the lab; LetsGetChecked cancels only before KitArrivedAtLab"
               if status in (ItemStatus.KIT_ARRIVED_AT_LAB, ItemStatus.RESULTS_AVAILABLE)
               else "LetsGetChecked did not accept it for processing" if status == ItemStatus.VALIDATION_FAILED
               else "its status is not one LetsGetChecked can cancel from")
        return out("refused", f"not cancelled: the item is {status or 'of unknown status'}; {why}")
    if it["cancel_state"] == CancelState.REQUESTED:
        return out("already requested", "a cancel was already requested; waiting for LetsGetChecked to confirm it")
    answer = await api.cancel_item(coid, item_id, body)
    now = datetime.now(UTC)
    values = (dict(cancel_state=CancelState.REQUESTED.value, cancel_requested_at=now, cancel_error=None)
              if answer.accepted else dict(cancel_error=answer.reason))
    await asyncio.to_thread(_set_item, engine, item_id, values)
    if answer.accepted:
        return out("requested", f"cancel requested (HTTP {answer.http_status}); LetsGetChecked "
                                "confirms it with status Cancelled (see labsync track)")
    return out("refused by LetsGetChecked", f"LetsGetChecked refused the cancel: {answer.reason}")


def mark_results_stored(conn: sa.Connection, barcode: str, now: datetime) -> None:
    """In the results' own transaction (etl.orders.results): the items with this barcode have
    both result documents stored, so the results candidates never read them again."""
    conn.execute(sa.update(items_t).where(items_t.c.barcode == barcode, items_t.c.results_stored_at.is_(None))
                 .values(results_stored_at=now))


def _set_item(engine: Engine, item_id: str, values: Mapping[str, Any]) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(items_t).where(items_t.c.item_id == item_id)
                     .values(updated_at=datetime.now(UTC), **values))
