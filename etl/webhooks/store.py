"""`webhook_events`: stored raw by the receiver, handed to the tasks that apply them.

    store_event(engine, source, body, ...)  -> (id, new)      the receiver, per delivery
    pending_events(engine, source, limit)   -> [Event]        a task, oldest first
    mark_events(engine, [(id, state, error)])                 the same task, after applying

A repeated delivery (same source, same bytes) is not stored twice; its `deliveries` counter goes
up instead. Applying must be idempotent anyway: an event can be applied, fail, and be retried.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.dialects import postgresql, sqlite

from etl.states import WebhookEventState
from etl.warehouse.tables import webhook_events

t = webhook_events
MAX_ERROR = 500
# Not a vendor event: the receiver's `GET /webhooks/rupa/return` stores one when a practitioner
# comes back from Rupa Checkout (`return_url?order=…`); etl.checkout.events links the order.
RUPA_CHECKOUT_RETURNED = "labsync.checkout_returned"


@dataclass(frozen=True)
class Event:
    id: int
    source: str
    event_type: str | None
    body: bytes
    received_at: datetime
    attempts: int
    authenticated: bool = False  # the delivery proved its sender: only then may its body be written

    def json(self):
        """The body as JSON (the receiver only stores bodies that parse, nested at most
        etl.webhooks.app.MAX_JSON_DEPTH deep). ValueError if it does not parse, a body nested too
        deeply for Python's parser included (stored before that limit, or written otherwise)."""
        try:
            return json.loads(self.body)
        except RecursionError:
            raise ValueError("the body is nested too deeply to read") from None


def event_type_of(document: object, *fields: str) -> str | None:
    """The first string among `fields` at the top level of the event document."""
    if isinstance(document, dict):
        for name in fields:
            value = document.get(name)
            if isinstance(value, str) and value.strip():
                return value.strip()[:100]
    return None


def store_event(engine: Engine, source: str, body: bytes, *, event_type: str | None,
                content_type: str | None = None, now: datetime | None = None,
                authenticated: bool = False) -> tuple[int, bool]:
    """Store one delivery; returns (event id, True if it was new). `authenticated`: the delivery
    proved its sender. A repeated delivery never lowers that; an authenticated repeat of an
    unauthenticated event raises it, and the event is applied again if it had been set aside
    (`ignored`) for want of it."""
    now = now or datetime.now(UTC)
    digest = hashlib.sha256(body).hexdigest()
    row = dict(source=source, sha256=digest, event_type=event_type,
               content_type=(content_type or "")[:100] or None, body=body, received_at=now,
               deliveries=1, state=WebhookEventState.RECEIVED, attempts=0, authenticated=authenticated)
    with engine.begin() as conn:
        insert = postgresql.insert(t) if conn.dialect.name == "postgresql" else sqlite.insert(t)
        new_id = conn.execute(
            insert.values(**row).on_conflict_do_nothing(index_elements=["source", "sha256"])
            .returning(t.c.id)
        ).scalar()
        if new_id is not None:
            return int(new_id), True
        values: dict = {"deliveries": t.c.deliveries + 1}
        if authenticated:
            was = sa.func.coalesce(t.c.authenticated, sa.false())
            values["state"] = sa.case((sa.and_(sa.not_(was), t.c.state == WebhookEventState.IGNORED),
                                       WebhookEventState.RECEIVED), else_=t.c.state)
            values["attempts"] = sa.case((sa.not_(was), 0), else_=t.c.attempts)
            values["authenticated"] = True
        old_id = conn.execute(
            sa.update(t).where(t.c.source == source, t.c.sha256 == digest)
            .values(**values).returning(t.c.id)
        ).scalar_one()
        return int(old_id), False


def pending_events(engine: Engine, source: str, *, limit: int = 500,
                   states: Iterable[str] = (WebhookEventState.RECEIVED, WebhookEventState.FAILED),
                   max_attempts: int | None = None, after_id: int | None = None) -> list[Event]:
    """Events of `source` still to apply (received, or failed before), oldest first.
    `after_id` pages through them (a pass that leaves some `failed` must not see them again)."""
    q = (sa.select(t.c.id, t.c.source, t.c.event_type, t.c.body, t.c.received_at, t.c.attempts,
                   t.c.authenticated)
         .where(t.c.source == source, t.c.state.in_(list(states)))
         .order_by(t.c.id).limit(limit))
    if max_attempts is not None:
        q = q.where(t.c.attempts < max_attempts)
    if after_id is not None:
        q = q.where(t.c.id > after_id)
    with engine.connect() as conn:
        return [Event(r.id, r.source, r.event_type, bytes(r.body), r.received_at, r.attempts, bool(r.authenticated))
                for r in conn.execute(q)]


def mark_events(engine: Engine, outcomes: Iterable[tuple[int, str, str | None]],
                *, now: datetime | None = None) -> int:
    """Record (event id, state, PHI-free error or None) after applying; returns rows updated."""
    now = now or datetime.now(UTC)
    params = [dict(k_id=i, v_state=str(state), v_error=(error or None) and error[:MAX_ERROR],
                   v_applied=now if state == WebhookEventState.APPLIED else None)
              for i, state, error in outcomes]
    if not params:
        return 0
    stmt = (sa.update(t).where(t.c.id == sa.bindparam("k_id"))
            .values(state=sa.bindparam("v_state"), error=sa.bindparam("v_error"),
                    applied_at=sa.bindparam("v_applied"), attempts=t.c.attempts + 1))
    with engine.begin() as conn:
        return conn.execute(stmt, params).rowcount


def counts(engine: Engine, source: str | None = None) -> dict[str, int]:
    """Events per state (for status commands and tests)."""
    q = sa.select(t.c.state, sa.func.count()).group_by(t.c.state)
    if source is not None:
        q = q.where(t.c.source == source)
    with engine.connect() as conn:
        return {state: n for state, n in conn.execute(q)}


PURGED_BODY = b""  # a purged event's body (the column is NOT NULL); its row and sha256 stay


def purge_bodies(conn: sa.Connection, cutoff: datetime, *, dry_run: bool = False) -> list[int]:
    """Retention (etl.retention): empty the raw bodies of events done with before `cutoff`:
    `applied`, or `ignored` after an authenticated delivery (an unauthenticated ignored event may
    still be revived by an authenticated repeat, so its body stays). The row and its sha256 stay:
    a repeated delivery is still known as one. Events still to apply (received, failed) are never
    touched. Returns the events' ids (emptied unless `dry_run`)."""
    done = sa.or_(t.c.state == WebhookEventState.APPLIED,
                  sa.and_(t.c.state == WebhookEventState.IGNORED, t.c.authenticated.is_(True)))
    where = sa.and_(done, sa.func.coalesce(t.c.applied_at, t.c.received_at) < cutoff, sa.func.length(t.c.body) > 0)
    ids = [int(i) for i in conn.execute(sa.select(t.c.id).where(where).order_by(t.c.id)).scalars()]
    if ids and not dry_run:
        conn.execute(sa.update(t).where(t.c.id.in_(ids), where).values(body=PURGED_BODY))
    return ids
