"""Results letters (LetsGetChecked's Outreach API) kept in `lgc_outreach_letters`; this module is
its one writer.

    confirm_events(engine, settings, events) -> {event id: (state, reason)}
        `outreach` webhooks are hints, like every LetsGetChecked event: each names a kit barcode and
        a letter type; what is stored is what our own GET of that notification answered
        (etl.lgc.outreach.get_notification), never the event's body. A barcode no tracked item has
        yet fails (retried after the next poll); a notification LetsGetChecked does not know is
        ignored. Called by etl.orders.lifecycle.apply_webhooks for the `outreach` events.
    poll_feed(engine, settings) -> OutreachSummary
        walk the letters feed from the event after the highest one stored, store each letter,
        then fetch every sent letter's PDF not stored yet.
    letters_of(engine, client_order_ids) -> {clientOrderId: {"patient": sent at | None, "pcp": …}}
    describe(letters) -> "patient sent 2026-01-02, PCP not sent"          (labsync status)

PDFs are PHI: stored once (sha256; a second fetch never overwrites one), never logged or shown.
Logs name barcodes, letter ids and clientOrderIds only.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.dialects import postgresql, sqlite

from etl.errors import ApiError
from etl.lgc import outreach as api_outreach
from etl.lgc.orders_api import open_session
from etl.settings import Settings
from etl.states import WebhookEventState
from etl.warehouse.tables import lgc_order_items, lgc_outreach_letters

log = logging.getLogger(__name__)
t = lgc_outreach_letters
FEED_PAGE = 200


def _aware(ts: datetime | None) -> datetime | None:
    return ts.replace(tzinfo=UTC) if ts is not None and ts.tzinfo is None else ts


def _run(coro):
    with asyncio.Runner() as runner:  # not lifecycle.run_async: lifecycle imports this module
        return runner.run(coro)


@dataclass
class OutreachSummary:
    letters: int = 0  # notifications stored or updated
    pdfs: int = 0  # letter documents stored
    failed: dict[str, str] = field(default_factory=dict)  # letter id or "feed" -> PHI-free reason
    requests: int = 0

    def line(self) -> str:
        return f"outreach: {self.letters} letters recorded, {self.pdfs} PDFs stored, {len(self.failed)} failed"

    def as_dict(self) -> dict:
        return {"letters": self.letters, "pdfs": self.pdfs, "failed": self.failed}


def _orders_by_barcode(conn: sa.Connection, barcodes: Iterable[str]) -> dict[str, tuple[str, str]]:
    codes = sorted(set(barcodes))
    out: dict[str, tuple[str, str]] = {}
    for i in range(0, len(codes), 500):
        for barcode, item_id, coid in conn.execute(
                sa.select(lgc_order_items.c.barcode, lgc_order_items.c.item_id, lgc_order_items.c.client_order_id)
                .where(lgc_order_items.c.barcode.in_(codes[i:i + 500]))):
            out[barcode] = (item_id, coid)
    return out


def record(engine: Engine, notes: Sequence[api_outreach.Notification], *, now: datetime | None = None) -> int:
    """Upsert the letters these notifications (LetsGetChecked's answers) describe; a newer
    timestamp wins, a PDF already stored is kept. Returns how many rows were written."""
    if not notes:
        return 0
    now = now or datetime.now(UTC)
    written = 0
    with engine.begin() as conn:
        where = _orders_by_barcode(conn, (n.barcode for n in notes))
        held = {r.letter_id: r for r in conn.execute(
            sa.select(t.c.letter_id, t.c.notified_at, t.c.feed_event_id)
            .where(t.c.letter_id.in_(sorted({n.letter_id for n in notes}))))}
        insert = postgresql.insert(t) if conn.dialect.name == "postgresql" else sqlite.insert(t)
        for n in notes:
            item_id, coid = where.get(n.barcode, (None, None))
            old = held.get(n.letter_id)
            row: dict[str, Any] = dict(letter_id=n.letter_id, barcode=n.barcode, audience=n.audience,
                                       letter_type=n.type, status=n.status, failure_reason=n.failure_reason,
                                       notified_at=n.timestamp, item_id=item_id, client_order_id=coid,
                                       feed_event_id=n.event_id, first_seen_at=now, updated_at=now)
            if old is None:
                conn.execute(insert.values(**row).on_conflict_do_nothing(index_elements=["letter_id"]))
                written += 1
                continue
            held_at = _aware(old.notified_at)
            newer = held_at is None or (n.timestamp is not None and n.timestamp >= held_at)
            values: dict[str, Any] = {"updated_at": now}
            if newer:
                values.update(status=n.status, failure_reason=n.failure_reason, notified_at=n.timestamp)
            if coid is not None:
                values.update(item_id=item_id, client_order_id=coid)
            if n.event_id is not None and (old.feed_event_id is None or n.event_id > old.feed_event_id):
                values["feed_event_id"] = n.event_id
            conn.execute(sa.update(t).where(t.c.letter_id == n.letter_id).values(**values))
            written += 1
    return written


def store_pdf(engine: Engine, letter_id: str, pdf: bytes, *, now: datetime | None = None) -> bool:
    """Store a letter's document once (sha256, size); False when one was already stored."""
    with engine.begin() as conn:
        done = conn.execute(sa.update(t).where(t.c.letter_id == letter_id, t.c.pdf.is_(None))
                            .values(pdf=pdf, pdf_sha256=hashlib.sha256(pdf).hexdigest(), pdf_size=len(pdf),
                                    pdf_fetched_at=now or datetime.now(UTC), updated_at=now or datetime.now(UTC)))
        return bool(done.rowcount)


def _pdfs_due(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(t.c.letter_id).where(
            t.c.pdf.is_(None), t.c.status == api_outreach.DELIVERY_SENT).order_by(t.c.letter_id)).scalars())


def _resolve_orders(engine: Engine) -> None:
    """Letters stored before their kit's barcode was known get their order now."""
    with engine.connect() as conn:
        missing = list(conn.execute(sa.select(t.c.barcode).where(t.c.client_order_id.is_(None))).scalars())
    if not missing:
        return
    with engine.begin() as conn:
        for barcode, (item_id, coid) in _orders_by_barcode(conn, missing).items():
            conn.execute(sa.update(t).where(t.c.barcode == barcode, t.c.client_order_id.is_(None))
                         .values(item_id=item_id, client_order_id=coid))


def feed_cursor(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.max(t.c.feed_event_id))).scalar() or 0)


async def _fetch_pdfs(engine: Engine, session, letter_ids: Sequence[str], summary: OutreachSummary) -> None:
    async def one(api, letter_id: str) -> None:
        pdf = await api_outreach.get_letter(api, letter_id)
        if pdf is None:
            summary.failed[letter_id] = "LetsGetChecked has no document for this letter yet (HTTP 404)"
            return
        if await asyncio.to_thread(store_pdf, engine, letter_id, pdf):
            summary.pdfs += 1
            log.info("letter %s: document stored (%d bytes)", letter_id, len(pdf))

    def failed(letter_id: str, exc: ApiError) -> None:
        summary.failed[letter_id] = str(exc)
        log.warning("letter %s: document not fetched: %s", letter_id, exc)

    await session.for_each(letter_ids, one, failed)


def poll_feed(engine: Engine, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None,
              max_pages: int = 1000) -> OutreachSummary:
    """Walk the letters feed from the event after the newest stored, record every letter, then
    fetch the PDFs of sent letters not stored yet."""
    return _run(_apoll(engine, settings, transport=transport, max_pages=max_pages))


async def _apoll(engine: Engine, settings: Settings, *, transport, max_pages: int) -> OutreachSummary:
    summary = OutreachSummary()
    await asyncio.to_thread(_resolve_orders, engine)
    start = await asyncio.to_thread(feed_cursor, engine) + 1
    async with open_session(settings, engine=engine, transport=transport, owner="outreach") as session:
        api = await session.api()
        try:
            for _ in range(max_pages):
                page = await api_outreach.letters_feed(api, start, limit=FEED_PAGE)
                if not page:
                    break
                summary.letters += await asyncio.to_thread(record, engine, page)
                ids = [n.event_id for n in page if n.event_id is not None]
                if not ids or max(ids) < start:
                    break  # a feed that does not move on: stop, read it again next run
                start = max(ids) + 1
        except ApiError as exc:
            summary.failed["feed"] = str(exc)
            log.warning("outreach: letters feed not read: %s", exc)
        await _fetch_pdfs(engine, session, await asyncio.to_thread(_pdfs_due, engine), summary)
        summary.requests = session.requests
    log.info("lifecycle: %s", summary.line())
    return summary


def confirm_events(engine: Engine, settings: Settings, events: Mapping[int, tuple[str, str]], *,
                   transport: httpx.AsyncBaseTransport | None = None) -> dict[int, tuple[str, str | None]]:
    """`outreach` events ({event id: (barcode, letter type)}) confirmed with a GET of the
    notification each names; the answers are stored, then the PDFs due fetched. Returns each
    event's outcome (applied / ignored / failed, with a PHI-free reason)."""
    return _run(_aconfirm(engine, settings, events, transport=transport))


async def _aconfirm(engine, settings, events, *, transport) -> dict[int, tuple[str, str | None]]:
    outcomes: dict[int, tuple[str, str | None]] = {}
    if not events:
        return outcomes

    def known() -> dict[str, tuple[str, str]]:
        with engine.connect() as conn:
            return _orders_by_barcode(conn, (b for b, _ in events.values()))

    where = await asyncio.to_thread(known)
    wanted: dict[tuple[str, str], list[int]] = {}
    for event_id, (barcode, kind) in events.items():
        if barcode not in where:
            outcomes[event_id] = (WebhookEventState.FAILED,
                                  "no tracked item has this barcode yet; retried after the next poll")
        else:
            wanted.setdefault((barcode, kind), []).append(event_id)
    if not wanted:
        return outcomes
    summary = OutreachSummary()
    async with open_session(settings, engine=engine, transport=transport, owner="outreach") as session:
        answers: dict[tuple[str, str], api_outreach.Notification] = {}

        async def one(api, key: tuple[str, str]) -> None:
            found = await api_outreach.get_notification(api, key[0], key[1])
            if found is None:
                for e in wanted[key]:
                    outcomes[e] = (WebhookEventState.IGNORED,
                                   f"LetsGetChecked has no {key[1]} notification for barcode {key[0]} (HTTP 404)")
                return
            answers[key] = found
            for e in wanted[key]:
                outcomes[e] = (WebhookEventState.APPLIED, None)

        def failed(key: tuple[str, str], exc: ApiError) -> None:
            for e in wanted[key]:
                outcomes[e] = (WebhookEventState.FAILED, f"confirming GET failed: {exc}")

        await session.for_each(list(wanted), one, failed)
        if answers:
            await asyncio.to_thread(record, engine, list(answers.values()))
            due = set(await asyncio.to_thread(_pdfs_due, engine))
            await _fetch_pdfs(engine, session, sorted(due & {n.letter_id for n in answers.values()}), summary)
    return outcomes


def letters_of(engine: Engine, client_order_ids: Sequence[str]) -> dict[str, dict[str, datetime | None]]:
    """Per order, when LetsGetChecked sent the patient's and the PCP's results letters (None: not sent)."""
    ids = list(dict.fromkeys(client_order_ids))
    out: dict[str, dict[str, datetime | None]] = {}
    with engine.connect() as conn:
        for i in range(0, len(ids), 500):
            for coid, audience, at, status in conn.execute(
                    sa.select(t.c.client_order_id, t.c.audience, t.c.notified_at, t.c.status)
                    .where(t.c.client_order_id.in_(ids[i:i + 500]))
                    .order_by(t.c.notified_at)):
                slot = out.setdefault(coid, {"patient": None, "pcp": None})
                if status == api_outreach.DELIVERY_SENT and audience in slot and slot[audience] is None:
                    slot[audience] = _aware(at)
    return out


def describe(letters: Mapping[str, datetime | None] | None) -> str:
    """`patient sent 2026-01-02, PCP not sent` (one line for tables)."""
    letters = letters or {}

    def one(name: str, key: str) -> str:
        at = letters.get(key)
        return f"{name} sent {at:%Y-%m-%d}" if at else f"{name} not sent"

    return f"{one('patient', 'patient')}, {one('PCP', 'pcp')}"
