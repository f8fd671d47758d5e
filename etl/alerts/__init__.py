"""Alerts that reach a person: what needs one, computed from the warehouse, sent once.

    evaluate(engine, settings, events=(), resolve=()) -> Report   # the DAG callbacks and the CLI
    status(engine) -> list[dict]                                   # `labsync alerts [--json]`

Conditions (each has a key; a key is one alert, however long it lasts):

    batch_unusable:<batch>     a file could not be used at all (fires once; nothing to resolve)
    batch_incomplete:<batch>   some valid rows of a batch are not settled yet
    rows_given_up:<batch>      rows failed LABSYNC_MAX_ATTEMPTS times and wait for a person
    breaker_tripped:<batch>    a load stopped because LetsGetChecked kept failing (or its deadline)
    credentials_refused:lgc    a load stopped because LetsGetChecked refused the credentials
    webhooks_unapplied:<src>   webhook events unapplied for LABSYNC_ALERT_WEBHOOK_MINUTES
    orders_unchecked:lgc       open orders not checked for LABSYNC_ALERT_UNCHECKED_MINUTES
    dag_failed:<dag>           a run of a labsync DAG failed (until a later run succeeds)
    deadline_missed:<dag>:<run> a run still going past LABSYNC_RUN_DEADLINE_MINUTES (fires once)

The `alerts` table (migration 0016_alerts; this module is its only writer) holds one row per
episode. A new condition opens a row and is sent; while it persists (or repeats, for a DAG that
keeps failing) it is folded into that row (`repeats`), and sent again only once per quiet period
(LABSYNC_ALERT_QUIET_MINUTES) as a reminder; when it clears the row is closed and a "resolved"
message goes out. A condition that comes back within the quiet period after it cleared reopens its
row silently (a flapping condition is one alert). A unique index on the open row per key makes two
processes that see the same condition at once send it once.

Messages are PHI-free by construction: they are built here from file names, batch ids, counts,
DAG and run ids and links, never from row contents, vendor answers or clientOrderIds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath

import sqlalchemy as sa
from sqlalchemy import Engine

from etl.settings import Settings
from etl.warehouse.tables import alerts as alerts_t
from etl.warehouse.tables import batch_files, lgc_order_items, lgc_outbox, webhook_events

log = logging.getLogger(__name__)

# conditions computed from the warehouse: an open alert of these kinds that is no longer seen is resolved
SCANNED = ("batch_incomplete", "rows_given_up", "breaker_tripped", "credentials_refused",
           "webhooks_unapplied", "orders_unchecked")
# fire once per key and are closed at once: an event, not a state
ONCE = ("batch_unusable", "deadline_missed")
KINDS = (*SCANNED, *ONCE, "dag_failed")


@dataclass(frozen=True)
class Condition:
    """One thing that needs a person, PHI-free: a title, one detail sentence, counts, a link."""

    key: str
    title: str
    detail: str = ""
    link: str | None = None
    counts: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.key.split(":", 1)[0]


@dataclass(frozen=True)
class Message:
    """What a destination receives: `status` firing | reminder | resolved | test."""

    status: str
    key: str
    kind: str
    title: str
    detail: str
    link: str | None
    counts: dict
    first_seen: str | None = None
    repeats: int = 0

    @property
    def subject(self) -> str:
        label = {"firing": "ALERT", "reminder": "STILL", "resolved": "RESOLVED", "test": "TEST"}[self.status]
        return f"[labsync] {label}: {self.title}"

    def text(self) -> str:
        lines = [self.subject]
        if self.detail:
            lines.append(self.detail)
        if self.status == "reminder" and self.repeats:
            lines.append(f"Seen {self.repeats} more time{'s' if self.repeats != 1 else ''} since {self.first_seen}.")
        if self.link:
            lines.append(self.link)
        lines.append(f"({self.key})")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"source": "labsync", **asdict(self), "subject": self.subject, "text": self.text()}


@dataclass
class Report:
    fired: list[str] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)
    reminded: list[str] = field(default_factory=list)
    resolved: list[str] = field(default_factory=list)
    sent: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (f"alerts: {len(self.fired)} fired, {len(self.reminded)} reminded, {len(self.folded)} folded, "
                f"{len(self.resolved)} resolved, {self.sent} message(s) sent"
                + (f", {len(self.errors)} send error(s)" if self.errors else ""))


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(ts: datetime | None) -> datetime | None:
    return None if ts is None or ts.tzinfo else ts.replace(tzinfo=UTC)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ---- the conditions, from the warehouse -------------------------------------------------------

def summary_link(settings: Settings, stored_as: str | None, name: str | None) -> str | None:
    """Where a batch's summary page is: the inbox joined with the page's path inside it."""
    from etl.intake.names import summary_path
    from etl.intake.storage import display  # a password in the inbox URL never reaches a message

    inside = stored_as or name
    if not inside:
        return None
    return f"{display(settings.inbox).rstrip('/')}/{summary_path(PurePosixPath(inside))}"


def scan(engine: Engine, settings: Settings, now: datetime | None = None) -> list[Condition]:
    """Every condition the warehouse shows now (PHI-free: names, ids and counts only)."""
    from etl.orders.load import STOPPED_ERROR
    from etl.states import FINAL_ITEM_STATUSES, BatchStatus, OutboxState, WebhookEventState

    now = now or _now()
    a = settings.alerts
    out: list[Condition] = []
    b, o = batch_files, lgc_outbox
    with engine.connect() as conn:
        batches = {r.id: r for r in conn.execute(sa.select(
            b.c.id, b.c.file_name, b.c.status, b.c.stored_as, b.c.valid_rows))}

        def name(batch_id) -> str:
            row = batches.get(batch_id)
            return PurePosixPath(row.file_name).name if row is not None else f"batch {batch_id}"

        def link(batch_id) -> str | None:
            row = batches.get(batch_id)
            return None if row is None else summary_link(settings, row.stored_as, row.file_name)

        for r in batches.values():
            if r.status == BatchStatus.UNUSABLE:
                out.append(Condition(f"batch_unusable:{r.id}", f"{name(r.id)} could not be used",
                                     "The file as a whole was refused; nothing in it was sent. Its "
                                     "summary page says why and how to fix it.", link(r.id), {"batch_id": r.id}))

        outcomes = conn.execute(sa.select(o.c.batch_id, o.c.outcome, sa.func.count())
                                .group_by(o.c.batch_id, o.c.outcome)).all()
        by_batch: dict[int, dict[str, int]] = {}
        for batch_id, outcome, n in outcomes:
            by_batch.setdefault(batch_id, {})[outcome] = n
        for r in batches.values():
            if r.status == BatchStatus.INCOMPLETE:
                counts = by_batch.get(r.id, {})
                waiting = sum(counts.get(s, 0) for s in (OutboxState.FAILED, OutboxState.PENDING,
                                                        OutboxState.UNCONFIRMED, OutboxState.QUEUED))
                out.append(Condition(
                    f"batch_incomplete:{r.id}", f"{name(r.id)} is incomplete",
                    f"{_plural(waiting, 'row')} of {r.valid_rows or 0} valid not settled yet; they go out "
                    "again on the next run.", link(r.id), {"batch_id": r.id, "rows_waiting": waiting}))
        for batch_id, counts in sorted(by_batch.items()):
            given_up = counts.get(OutboxState.GIVEN_UP, 0)
            if given_up:
                out.append(Condition(
                    f"rows_given_up:{batch_id}", f"{_plural(given_up, 'row')} of {name(batch_id)} given up",
                    f"They failed {settings.max_attempts} times and are not sent again by themselves: "
                    "`labsync retry` sends them once the cause is fixed.", link(batch_id),
                    {"batch_id": batch_id, "rows_given_up": given_up}))

        failed = o.c.outcome == OutboxState.FAILED
        tripped = conn.execute(sa.select(o.c.batch_id, sa.func.count()).where(
            failed, sa.or_(o.c.last_error.like("not sent: %; sent again on the next run"),
                           o.c.last_error.like("%then the batch stopped: %")),
            o.c.last_error != STOPPED_ERROR).group_by(o.c.batch_id)).all()
        for batch_id, n in tripped:
            out.append(Condition(
                f"breaker_tripped:{batch_id}", f"LetsGetChecked stopped answering during {name(batch_id)}",
                f"The load's circuit breaker opened (repeated failures or its deadline); "
                f"{_plural(n, 'row')} were not sent and go out on the next run.", link(batch_id),
                {"batch_id": batch_id, "rows_not_sent": n}))
        refused = conn.execute(sa.select(sa.func.count()).where(failed, o.c.last_error == STOPPED_ERROR)).scalar_one()
        if refused:
            out.append(Condition(
                "credentials_refused:lgc", "LetsGetChecked refused the credentials",
                f"Loads stop at once; {_plural(refused, 'row')} wait. Fix the lgc_default connection "
                "(access and secret keys), then the next run sends them.", None, {"rows_waiting": refused}))

        w = webhook_events
        before = now - timedelta(minutes=a.webhook_minutes)
        for source, n in conn.execute(sa.select(w.c.source, sa.func.count()).where(
                w.c.state.in_([WebhookEventState.RECEIVED, WebhookEventState.FAILED]),
                w.c.received_at < before).group_by(w.c.source)).all():
            out.append(Condition(
                f"webhooks_unapplied:{source}",
                f"{_plural(n, 'webhook event')} from {'LetsGetChecked' if source == 'lgc' else 'Rupa'} "
                f"unapplied for over {a.webhook_minutes:g} minutes",
                "Is the DAG that applies them (lgc_lifecycle / rupa_checkout) running? Its log says why "
                "an event failed.", None, {"events": n}))

        i = lgc_order_items
        stale = now - timedelta(minutes=a.unchecked_minutes)
        n = conn.execute(sa.select(sa.func.count(sa.distinct(i.c.client_order_id))).where(
            sa.or_(i.c.status.is_(None), i.c.status.not_in([str(s) for s in FINAL_ITEM_STATUSES])),
            sa.func.coalesce(i.c.last_checked_at, i.c.first_seen_at) < stale)).scalar_one()
        if n:
            out.append(Condition(
                "orders_unchecked:lgc", f"{_plural(n, 'open order')} not checked for over "
                f"{a.unchecked_minutes:g} minutes",
                "The sweep of lgc_lifecycle is behind or failing: statuses and results may be missed.",
                None, {"orders": n}))
    return out


# ---- the state: one row per episode (the only writer of `alerts`) ------------------------------

def evaluate(engine: Engine, settings: Settings, *, events: Sequence[Condition] = (),
             resolve: Iterable[str] = (), scan_warehouse: bool = True, now: datetime | None = None,
             send=None) -> Report:
    """Compare what needs a person now (the warehouse's conditions plus `events` from Airflow)
    with the open alerts; send what is new, remind once per quiet period, resolve what cleared
    (and the keys in `resolve`). `send(messages) -> (sent, errors)` defaults to the configured
    destinations (etl.alerts.destinations)."""
    now = now or _now()
    quiet = timedelta(minutes=settings.alerts.validated().quiet_minutes)
    seen = list(scan(engine, settings, now)) if scan_warehouse else []
    seen += list(events)
    report = Report()
    outgoing: list[tuple[int, Message]] = []
    t = alerts_t
    with engine.begin() as conn:
        open_rows = {r.condition_key: r for r in conn.execute(sa.select(t).where(t.c.resolved_at.is_(None)))}
        seen_keys = set()
        for c in seen:
            if c.key in seen_keys:
                continue
            seen_keys.add(c.key)
            row = open_rows.get(c.key)
            if row is not None:  # persists or repeats: fold; remind once per quiet period
                values: dict = {"last_seen": now, "repeats": row.repeats + 1}
                last = _aware(row.sent_at)
                if last is not None and now - last >= quiet and quiet > timedelta(0):
                    values["sent_at"] = None  # marks it to be sent again below
                    report.reminded.append(c.key)
                    outgoing.append((row.id, _message("reminder", c, row.first_seen, row.repeats + 1)))
                else:
                    report.folded.append(c.key)
                values.update(message=_sentence(c), link=c.link)
                conn.execute(sa.update(t).where(t.c.id == row.id).values(**values))
                continue
            last_row = conn.execute(sa.select(t).where(t.c.condition_key == c.key)
                                    .order_by(t.c.id.desc()).limit(1)).first()
            if c.kind in ONCE and last_row is not None:
                continue  # an event fires once, ever
            cleared_at = None if last_row is None else _aware(last_row.resolved_at)
            if last_row is not None and cleared_at is not None and now - cleared_at < quiet:
                # flapping: it cleared a moment ago; reopen that alert silently
                conn.execute(sa.update(t).where(t.c.id == last_row.id).values(
                    resolved_at=None, resolved_sent_at=None, last_seen=now, repeats=last_row.repeats + 1))
                report.folded.append(c.key)
                continue
            try:
                with conn.begin_nested():
                    new_id = conn.execute(sa.insert(t).values(
                        condition_key=c.key, kind=c.kind, message=_sentence(c), link=c.link, first_seen=now,
                        last_seen=now, repeats=0, resolved_at=now if c.kind in ONCE else None))
                    new_id = new_id.inserted_primary_key[0]  # type: ignore[index]
            except sa.exc.IntegrityError:  # another process opened it a moment ago: it sends it
                report.folded.append(c.key)
                continue
            report.fired.append(c.key)
            outgoing.append((new_id, _message("firing", c, now, 0)))
        cleared = [r for k, r in open_rows.items()
                   if k not in seen_keys and ((scan_warehouse and r.kind in SCANNED) or k in set(resolve))]
        for r in cleared:
            conn.execute(sa.update(t).where(t.c.id == r.id).values(resolved_at=now))
            report.resolved.append(r.condition_key)
            if r.sent_at is not None:
                outgoing.append((-r.id, Message("resolved", r.condition_key, r.kind, _resolved_title(r),
                                                "The condition cleared.", r.link, {},
                                                _iso(r.first_seen), r.repeats)))
        # alerts that could not be sent before (no destination then, or it failed) go out now
        retry = sa.or_(t.c.resolved_at.is_(None), sa.and_(t.c.kind.in_(ONCE), t.c.first_seen > now - timedelta(days=1)))
        for r in conn.execute(sa.select(t).where(t.c.sent_at.is_(None), retry)):
            if r.condition_key not in {m.key for _, m in outgoing}:
                outgoing.append((r.id, Message("firing", r.condition_key, r.kind, r.message.split("\n")[0],
                                               "\n".join(r.message.split("\n")[1:]), r.link, {},
                                               _iso(r.first_seen), r.repeats)))
    if not outgoing:
        return report
    if send is None:
        from etl.alerts.destinations import send_all

        def send(messages):
            return send_all(settings, messages)

    for row_id, message in outgoing:
        took, errors = send([message])
        report.errors += errors
        report.sent += len(took) if took else 0
        if took:
            with engine.begin() as conn:
                if row_id < 0:
                    conn.execute(sa.update(t).where(t.c.id == -row_id).values(resolved_sent_at=_now()))
                else:
                    conn.execute(sa.update(t).where(t.c.id == row_id).values(
                        sent_at=_now(), sent_to=",".join(took)[:1000], send_error=None))
        elif errors and row_id > 0:
            with engine.begin() as conn:
                conn.execute(sa.update(t).where(t.c.id == row_id).values(send_error="; ".join(errors)[:1000]))
    return report


def _iso(ts: datetime | None) -> str | None:
    ts = _aware(ts)
    return None if ts is None else ts.isoformat(timespec="seconds")


def _sentence(c: Condition) -> str:
    return c.title + (f"\n{c.detail}" if c.detail else "")


def _resolved_title(row) -> str:
    return row.message.split("\n")[0]


def _message(status: str, c: Condition, first_seen: datetime, repeats: int) -> Message:
    return Message(status, c.key, c.kind, c.title, c.detail, c.link, dict(c.counts), _iso(first_seen), repeats)


def test_message() -> Message:
    return Message("test", "test", "test", "a test message from `labsync alerts test`",
                   "If you read this, alerts reach you here.", None, {})


def status(engine: Engine, *, limit: int = 200) -> list[dict]:
    """What fired and what is still open, newest first (PHI-free: the stored sentences)."""
    t = alerts_t
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t).order_by(t.c.resolved_at.is_not(None), t.c.last_seen.desc())
                            .limit(limit)).all()
    out = []
    for r in rows:
        state = ("open" if r.resolved_at is None else "fired" if r.kind in ONCE else "resolved")
        out.append({"key": r.condition_key, "kind": r.kind, "state": state,
                    "title": r.message.split("\n")[0], "link": r.link, "first_seen": _aware(r.first_seen),
                    "last_seen": _aware(r.last_seen), "repeats": r.repeats, "sent_at": _aware(r.sent_at),
                    "sent_to": r.sent_to, "send_error": r.send_error, "resolved_at": _aware(r.resolved_at)})
    return out
