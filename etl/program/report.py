"""The program's numbers: where every order item is, how long each stage takes, what needs a
person today. Read from the `lgc_item_stages` view (migration 0015_program_view) and the ledger,
computed in Python (the same on SQLite and PostgreSQL), PHI-free: clientOrderIds, participant
ids, item ids, barcodes, kit codes, batch ids, program codes, stages and vendor timestamps.

    build(engine, program=None, *, now=None, dispatched_days=14, lab_days=7) -> list[Program]
        one Program per program_code (or just the one named); `Program.as_dict()` is what
        `labsync program --json` prints and what the page shows.

Definitions (docs/warehouse.md says the same):
- an item's **stage** is its current status mapped to sent, accepted, kit_dispatched,
  registered, at_lab, results_available, cancelled, failed (`STAGES`);
- an **order's stage** is the stage of its least advanced item still on the way (cancelled or
  failed only when every item is); an order with no item known yet is `sent` (`failed` when
  LetsGetChecked rejected it);
- the **funnel** counts, per week of sending (Monday, UTC), the items that reached each stage
  (seen in it, or now past it);
- a stage's **time** is from the first vendor timestamp of the stage before to the first of this
  one; the median is the middle value (the mean of the two middle ones), the 90th percentile the
  nearest-rank value (the smallest value at least 90 % of the times do not exceed);
- **needs a person**: kits dispatched more than `dispatched_days` days ago and not registered,
  registered more than `lab_days` days ago and not at the lab, results available but not stored
  (no `lgc_results` row for the barcode), orders unconfirmed or given up.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from etl.states import OrderState, OutboxState
from etl.warehouse.tables import (
    TS,
    lgc_order_items,
    lgc_order_programs,
    lgc_orders,
    lgc_outbox,
    lgc_outreach_letters,
    lgc_results,
)

STAGES = ("sent", "accepted", "kit_dispatched", "registered", "at_lab", "results_available",
          "cancelled", "failed")
PATH = STAGES[:6]  # the way forward, in order
STAGE_LABELS = {"sent": "sent", "accepted": "accepted", "kit_dispatched": "kit dispatched",
                "registered": "registered", "at_lab": "at lab", "results_available": "results available",
                "cancelled": "cancelled", "failed": "failed"}
STAMP = {"sent": "sent_at", "accepted": "accepted_at", "kit_dispatched": "kit_dispatched_at",
         "registered": "registered_at", "at_lab": "at_lab_at", "results_available": "results_available_at"}
# (name, from stage, to stage): the times the page reports
STEPS = (("accepted", "sent", "accepted"), ("kit_dispatched", "accepted", "kit_dispatched"),
         ("registered", "kit_dispatched", "registered"), ("at_lab", "registered", "at_lab"),
         ("results_available", "at_lab", "results_available"), ("sent_to_results", "sent", "results_available"))
STEP_LABELS = {"accepted": "sent → accepted", "kit_dispatched": "accepted → kit dispatched",
               "registered": "kit dispatched → registered", "at_lab": "registered → at lab",
               "results_available": "at lab → results available",
               "sent_to_results": "sent → results available (whole)"}
NO_PROGRAM = "(no program)"

_COLUMNS = ("item_id", "client_order_id", "code", "program_code", "participant_id", "batch_id",
            "current_status", "stage", "stage_since", "barcode", "sent_at", "accepted_at",
            "kit_dispatched_at", "registered_at", "at_lab_at", "results_available_at", "cancelled_at",
            "failed_at")
_TIMES = {"stage_since", "sent_at", "accepted_at", "kit_dispatched_at", "registered_at", "at_lab_at",
          "results_available_at", "cancelled_at", "failed_at"}
item_stages = sa.table("lgc_item_stages", *(
    sa.column(c, TS if c in _TIMES else sa.Integer() if c == "batch_id" else sa.String())
    for c in _COLUMNS))

# the lists of "needs a person", in the page's order, and their CSV columns
LISTS = {
    "not_registered": ("client_order_id", "participant_id", "item_id", "code", "batch_id",
                       "kit_dispatched_at", "days_waiting"),
    "not_at_lab": ("client_order_id", "participant_id", "item_id", "code", "barcode", "batch_id",
                   "registered_at", "days_waiting"),
    "results_not_stored": ("client_order_id", "participant_id", "item_id", "code", "barcode", "batch_id",
                           "results_available_at"),
    "unconfirmed_or_given_up": ("client_order_id", "participant_id", "batch_id", "state", "last_error"),
}
LIST_TITLES = {
    "not_registered": "Kits dispatched more than {dispatched_days} days ago and not registered",
    "not_at_lab": "Kits registered more than {lab_days} days ago and not at the lab",
    "results_not_stored": "Results available but not stored by labsync",
    "unconfirmed_or_given_up": "Orders still unconfirmed or given up",
}
LETTER_COLUMNS = ("client_order_id", "participant_id", "barcode", "patient_letter_sent_at", "pcp_letter_sent_at")


def _aware(ts: datetime | None) -> datetime | None:
    if ts is not None and ts.tzinfo is None:
        return ts.replace(tzinfo=UTC)
    return ts


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest rank: the smallest value such that at least q % of the values do not exceed it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def week_of(ts: datetime) -> str:
    """The Monday (UTC) of a timestamp's week, as YYYY-MM-DD."""
    day = ts.astimezone(UTC).date()
    return (day - timedelta(days=day.weekday())).isoformat()


def _rank(stage: str) -> int:
    return PATH.index(stage) if stage in PATH else -1


def reached(row: Mapping[str, Any], stage: str) -> bool:
    """The item was seen in `stage` or is now past it on the way forward."""
    if stage == "sent":
        return True
    return row.get(STAMP[stage]) is not None or _rank(row["stage"]) >= PATH.index(stage)


def order_stage(stages: Iterable[str]) -> str:
    stages = list(stages)
    open_ = [s for s in stages if s in PATH]
    if open_:
        return min(open_, key=PATH.index)
    return "cancelled" if "cancelled" in stages else "failed"


@dataclass
class Timing:
    count: int
    median_seconds: float | None
    p90_seconds: float | None

    def as_dict(self) -> dict:
        return {"count": self.count, "median_seconds": self.median_seconds, "p90_seconds": self.p90_seconds,
                "median_days": _days(self.median_seconds), "p90_days": _days(self.p90_seconds)}


def _days(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds / 86400, 2)


def timings(rows: Iterable[Mapping[str, Any]]) -> dict[str, Timing]:
    """Median and 90th percentile of each step over the rows that have both timestamps."""
    spans: dict[str, list[float]] = {name: [] for name, _, _ in STEPS}
    for r in rows:
        for name, a, b in STEPS:
            start, end = r.get(STAMP[a]), r.get(STAMP[b])
            if start is not None and end is not None:
                spans[name].append((end - start).total_seconds())
    return {name: Timing(len(v), median(v), percentile(v, 90)) for name, v in spans.items()}


@dataclass
class Program:
    code: str
    generated_at: datetime
    dispatched_days: int
    lab_days: int
    items: int = 0
    orders: int = 0
    stages: dict[str, int] = field(default_factory=dict)  # items per stage
    order_stages: dict[str, int] = field(default_factory=dict)  # orders per stage
    funnel: list[dict] = field(default_factory=list)  # per week of sending
    timing: dict[str, Timing] = field(default_factory=dict)
    batch_timing: dict[int | None, dict[str, Timing]] = field(default_factory=dict)
    batch_stages: dict[int | None, dict[str, int]] = field(default_factory=dict)
    lists: dict[str, list[dict]] = field(default_factory=dict)
    letters: list[dict] = field(default_factory=list)  # per order with results available

    def as_dict(self) -> dict:
        def stamp(v: Any) -> Any:
            return v  # datetimes stay datetimes: etl.commands.jsonout writes them ISO 8601 UTC

        return {
            "program_code": self.code,
            "generated_at": self.generated_at,
            "dispatched_days": self.dispatched_days,
            "lab_days": self.lab_days,
            "items": self.items,
            "orders": self.orders,
            "stages": self.stages,
            "order_stages": self.order_stages,
            "funnel": self.funnel,
            "timing": {k: t.as_dict() for k, t in self.timing.items()},
            "batches": [{"batch_id": b, "stages": self.batch_stages[b],
                         "timing": {k: t.as_dict() for k, t in self.batch_timing[b].items()}}
                        for b in sorted(self.batch_stages, key=lambda x: (x is None, x or 0))],
            "lists": {k: [{c: stamp(r.get(c)) for c in LISTS[k]} for r in rows] for k, rows in self.lists.items()},
            "letters": [{c: stamp(r.get(c)) for c in LETTER_COLUMNS} for r in self.letters],
        }


def programs(engine: Engine) -> list[str]:
    """Every program code with an order in the ledger (NO_PROGRAM for orders without one)."""
    q = (sa.select(sa.func.coalesce(lgc_order_programs.c.program_code, NO_PROGRAM)).distinct()
         .select_from(lgc_orders.outerjoin(lgc_order_programs,
                                           lgc_order_programs.c.client_order_id == lgc_orders.c.client_order_id)))
    with engine.connect() as conn:
        return sorted(conn.execute(q).scalars())


def _program_filter(column, program: str):
    return column.is_(None) if program == NO_PROGRAM else column == program


def _stage_rows(conn: sa.Connection, program: str) -> list[dict]:
    q = sa.select(item_stages).where(_program_filter(item_stages.c.program_code, program))
    out = []
    for r in conn.execute(q):
        d = dict(r._mapping)
        for c in _TIMES:
            d[c] = _aware(d[c])
        out.append(d)
    return out


def _stored_barcodes(conn: sa.Connection, barcodes: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for i in range(0, len(barcodes), 500):
        found.update(conn.execute(sa.select(lgc_results.c.barcode)
                                  .where(lgc_results.c.barcode.in_(barcodes[i:i + 500]))).scalars())
    return found


def _unsettled(conn: sa.Connection, program: str) -> list[dict]:
    """Orders of the program the ledger holds `unconfirmed`, or whose newest outbox row gave up."""
    p, o, ob = lgc_order_programs, lgc_orders, lgc_outbox
    joined = o.outerjoin(p, p.c.client_order_id == o.c.client_order_id)
    rows: dict[str, dict] = {}
    q = (sa.select(o.c.client_order_id, p.c.participant_id, o.c.batch_id, o.c.state, o.c.last_error)
         .select_from(joined)
         .where(o.c.state == OrderState.UNCONFIRMED, _program_filter(p.c.program_code, program)))
    for r in conn.execute(q):
        rows[r.client_order_id] = dict(r._mapping)
    settled = (sa.select(o.c.client_order_id).where(o.c.state.in_([OrderState.ACCEPTED, OrderState.CONFLICT,
                                                                   OrderState.REJECTED])))
    q2 = (sa.select(ob.c.client_order_id, p.c.participant_id, ob.c.batch_id, ob.c.outcome, ob.c.last_error)
          .select_from(ob.outerjoin(p, p.c.client_order_id == ob.c.client_order_id))
          .where(ob.c.outcome == OutboxState.GIVEN_UP, _program_filter(p.c.program_code, program),
                 ob.c.client_order_id.notin_(settled))
          .order_by(ob.c.id))
    for r in conn.execute(q2):
        rows.setdefault(r.client_order_id, dict(client_order_id=r.client_order_id, participant_id=r.participant_id,
                                                batch_id=r.batch_id, state=r.outcome, last_error=r.last_error))
    return [rows[k] for k in sorted(rows)]


def _orders_without_items(conn: sa.Connection, program: str) -> list[tuple[str, str]]:
    """(clientOrderId, ledger state) of the program's orders with no item known yet (not
    tracked yet, or never accepted)."""
    p, o, i = lgc_order_programs, lgc_orders, lgc_order_items
    q = (sa.select(o.c.client_order_id, o.c.state)
         .select_from(o.outerjoin(p, p.c.client_order_id == o.c.client_order_id))
         .where(_program_filter(p.c.program_code, program),
                ~sa.exists().where(i.c.client_order_id == o.c.client_order_id)))
    return [(r.client_order_id, r.state) for r in conn.execute(q)]


def letters_by_order(conn: sa.Connection, coids: Sequence[str]) -> dict[str, dict[str, datetime | None]]:
    """{clientOrderId: {"patient": sent at, "pcp": sent at}} for letters LetsGetChecked sent."""
    t = lgc_outreach_letters
    out: dict[str, dict[str, datetime | None]] = {}
    for i in range(0, len(coids), 500):
        for coid, audience, at in conn.execute(
                sa.select(t.c.client_order_id, t.c.audience, t.c.notified_at)
                .where(t.c.client_order_id.in_(coids[i:i + 500]), t.c.status == "DeliverySent")):
            slot = out.setdefault(coid, {"patient": None, "pcp": None})
            at = _aware(at)
            if audience in slot and (slot[audience] is None or (at is not None and at < slot[audience])):  # type: ignore[operator]
                slot[audience] = at
    return out


def build_one(engine: Engine, program: str, *, now: datetime | None = None, dispatched_days: int = 14,
              lab_days: int = 7) -> Program:
    now = now or datetime.now(UTC)
    out = Program(program, now, dispatched_days, lab_days)
    with engine.connect() as conn:
        rows = _stage_rows(conn, program)
        itemless = _orders_without_items(conn, program)
        unsettled = _unsettled(conn, program)
        results = [r["barcode"] for r in rows if r["stage"] == "results_available" and r["barcode"]]
        stored = _stored_barcodes(conn, results)
        with_results = sorted({r["client_order_id"] for r in rows if r["stage"] == "results_available"})
        letters = letters_by_order(conn, with_results)
    out.items = len(rows)
    counts = Counter(r["stage"] for r in rows)
    out.stages = {s: counts.get(s, 0) for s in STAGES}
    per_order: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        per_order[r["client_order_id"]].append(r["stage"])
    for coid, state in itemless:  # known to the ledger only: sent (or refused by LetsGetChecked)
        per_order[coid].append("failed" if state == OrderState.REJECTED else "sent")
    out.orders = len(per_order)
    oc = Counter(order_stage(v) for v in per_order.values())
    out.order_stages = {s: oc.get(s, 0) for s in STAGES}
    weeks: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        if r["sent_at"] is None:
            continue
        w = weeks[week_of(r["sent_at"])]
        for s in PATH:
            if reached(r, s):
                w[s] += 1
    out.funnel = [{"week": wk, **{s: weeks[wk].get(s, 0) for s in PATH}} for wk in sorted(weeks)]
    out.timing = timings(rows)
    by_batch: dict[int | None, list[dict]] = defaultdict(list)
    for r in rows:
        by_batch[r["batch_id"]].append(r)
    for b, rs in by_batch.items():
        out.batch_timing[b] = timings(rs)
        c = Counter(r["stage"] for r in rs)
        out.batch_stages[b] = {s: c.get(s, 0) for s in STAGES}
    # what needs a person today
    d_limit, l_limit = now - timedelta(days=dispatched_days), now - timedelta(days=lab_days)

    def since(r: dict, column: str) -> datetime | None:
        return r.get(column) or r.get("stage_since")

    def waiting(at: datetime | None) -> float | None:
        return None if at is None else round((now - at).total_seconds() / 86400, 1)

    not_registered, not_at_lab, not_stored = [], [], []
    for r in rows:
        if r["stage"] == "kit_dispatched" and (at := since(r, "kit_dispatched_at")) is not None and at < d_limit:
            not_registered.append({**r, "kit_dispatched_at": at, "days_waiting": waiting(at)})
        elif r["stage"] == "registered" and (at := since(r, "registered_at")) is not None and at < l_limit:
            not_at_lab.append({**r, "registered_at": at, "days_waiting": waiting(at)})
        elif r["stage"] == "results_available" and r["barcode"] not in stored:
            not_stored.append({**r, "results_available_at": since(r, "results_available_at")})

    def key(r: dict) -> tuple:
        return (r["client_order_id"], r["item_id"])

    out.lists = {"not_registered": sorted(not_registered, key=key), "not_at_lab": sorted(not_at_lab, key=key),
                 "results_not_stored": sorted(not_stored, key=key), "unconfirmed_or_given_up": unsettled}
    participants = {r["client_order_id"]: r["participant_id"] for r in rows}
    barcodes: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r["stage"] == "results_available" and r["barcode"]:
            barcodes[r["client_order_id"]].append(r["barcode"])
    out.letters = [{"client_order_id": c, "participant_id": participants.get(c),
                    "barcode": " ".join(sorted(barcodes.get(c, []))),
                    "patient_letter_sent_at": letters.get(c, {}).get("patient"),
                    "pcp_letter_sent_at": letters.get(c, {}).get("pcp")} for c in with_results]
    return out


def build(engine: Engine, program: str | None = None, *, now: datetime | None = None,
          dispatched_days: int = 14, lab_days: int = 7) -> list[Program]:
    codes = [program] if program is not None else programs(engine)
    now = now or datetime.now(UTC)
    return [build_one(engine, c, now=now, dispatched_days=dispatched_days, lab_days=lab_days) for c in codes]
