"""Rupa events, the applying side: `webhook_events` (stored raw by the receiver) into
`rupa_orders`, `rupa_ordered_tests`, `rupa_patients`, `rupa_lab_tests`, and result files into
`rupa_results`.

    apply_events(engine, settings) -> ApplySummary     (`labsync rupa apply-events`, DAG task rupa_events)

Rules:
- Events arrive at least once and in any order. Each row remembers the `created_at` of the event
  it was last written from (`event_created_at`; patients and lab tests: their own `updated_at`),
  and an event older than that is skipped (counted `stale`), so the final state is the newest
  event's whatever the delivery order. Equal times apply again, which changes nothing.
- `order.updated` / `order.new_result` carry the Order (`data.object`) and its ordered tests
  (`data.included`): both are upserted; the order is linked to its order intent through the
  `order_intent` relationship, and `rupa_order_intents.order_id` is filled in. The practitioner's
  return (`return_url?order=…`, when the return_url is the receiver's `/webhooks/rupa/return`)
  links the same way.
- `results_pdf` / `results_hl7` links are short-lived: an event bringing a link marks the ordered
  test `results_pending`, and the same run downloads it at once (no token is sent with it). The
  bytes are stored with their sha256, one row per distinct content per ordered test and kind, so
  Rupa repeating `order.new_result` stores nothing twice, while a correction (new content) adds
  a row. A download that fails (an expired link, an outage) stays pending, is retried by the next
  run, and a newer event's fresh link replaces the stale one.
- **Events are hints unless authenticated** (the receiver records whether a delivery proved its
  sender: RUPA_WEBHOOK_SECRET's signature or RUPA_WEBHOOK_PATH's capability URL). A `patient.*` /
  `labtest.*` event only names a resource: labsync GETs it from Rupa's API and writes what Rupa
  answered (a resource Rupa does not know is not written); the event's own body is never written.
  Rupa's API has no order to GET, so an `order.*` event, and the practitioner's return, are
  applied only when authenticated; an unauthenticated one is set aside (`ignored`, counted
  `unauthenticated`) and applied if the same event is later delivered authenticated.
- `patient.*` and `labtest.*` upsert the extraction's tables (same columns and hash).
- An event that cannot be applied is marked `failed` with a PHI-free reason and retried by the
  next run, up to MAX_ATTEMPTS; unknown types are `ignored`.

Result contents, result link URLs, names and other patient data never appear in logs or errors:
those name event ids, order ids and ordered-test ids.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from etl.errors import ApiError, BadEvent, DownloadFailed
from etl.extract.store import timestamp as _timestamp
from etl.extract.streams import STREAMS, row_dict
from etl.http import (
    MAX_REDIRECTS,
    Download,
    OriginPolicy,
    OverCap,
    Refused,
    RetryableStatus,
    describe_transport_error,
    download_to_file,
    make_checked_client,
    raise_for_retryable,
    retrying,
)
from etl.results import observations
from etl.settings import Settings
from etl.states import WebhookEventState
from etl.warehouse import (
    rupa_order_intents,
    rupa_ordered_tests,
    rupa_orders,
    rupa_results,
    upsert,
)
from etl.webhooks import store

log = logging.getLogger(__name__)

SOURCE = "rupa"
MAX_ATTEMPTS = 5
RETURN_EVENT = store.RUPA_CHECKOUT_RETURNED  # written by the receiver's /webhooks/rupa/return
RESULT_KINDS = {"pdf": "results_pdf", "hl7": "results_hl7"}

APPLIED, STALE, IGNORED, FAILED = "applied", "stale", "ignored", "failed"
UNAUTHENTICATED, UNKNOWN = "unauthenticated", "not known to Rupa"  # both marked ignored
# the events that name a resource Rupa's API can confirm: event type -> extraction stream
CONFIRMED_BY_GET = {"patient.created": "patients", "patient.updated": "patients",
                    "labtest.created": "lab_tests", "labtest.updated": "lab_tests",
                    "lab_test.created": "lab_tests", "lab_test.updated": "lab_tests"}
_REASONS = {
    STALE: "older than the stored state; skipped",
    UNAUTHENTICATED: "not applied: the delivery was not authenticated and Rupa's API cannot confirm it "
                     "(set RUPA_WEBHOOK_SECRET or RUPA_WEBHOOK_PATH)",
    UNKNOWN: "Rupa's API does not know the resource the event names; nothing written",
}


@dataclass
class ApplySummary:
    events: Counter = field(default_factory=Counter)  # applied / stale / ignored / failed
    orders: int = 0  # order rows written
    ordered_tests: int = 0
    results_stored: int = 0  # new result files (distinct content)
    results_repeated: int = 0  # downloads whose content was already stored
    downloads_failed: int = 0  # links still pending (retried next run)

    def line(self) -> str:
        ev = ", ".join(f"{k} {v}" for k, v in sorted(self.events.items())) or "none"
        return (f"rupa events: {ev}; orders written {self.orders}, ordered tests {self.ordered_tests}; "
                f"results stored {self.results_stored}, already stored {self.results_repeated}, "
                f"downloads pending {self.downloads_failed}")

    @property
    def exit_code(self) -> int:
        return 1 if self.events.get(FAILED) or self.downloads_failed else 0

    def as_dict(self) -> dict:
        return {"events": dict(self.events), "orders": self.orders, "ordered_tests": self.ordered_tests,
                "results_stored": self.results_stored, "results_repeated": self.results_repeated,
                "downloads_failed": self.downloads_failed}


def _aware(ts: datetime | None) -> datetime | None:
    return ts.replace(tzinfo=UTC) if ts is not None and ts.tzinfo is None else ts


def _rel_id(resource: dict, name: str) -> str | None:
    rel = (resource.get("relationships") or {}).get(name)
    data = rel.get("data") if isinstance(rel, dict) else None
    return str(data["id"]) if isinstance(data, dict) and data.get("id") else None


def _link(value) -> str | None:
    """A results link as the event gives it: a URL string, or an object with url/href."""
    if isinstance(value, dict):
        value = value.get("url") or value.get("href")
    return value if isinstance(value, str) and value.startswith(("http://", "https://")) else None


def _newer(stored: datetime | None, incoming: datetime) -> bool:
    """Apply unless what is stored came from a strictly newer event."""
    stored = _aware(stored)
    return stored is None or incoming >= stored


# ---- one event ----------------------------------------------------------------------------------
def _envelope(doc) -> tuple[datetime | None, dict, list]:
    if not isinstance(doc, dict):
        raise BadEvent("the event is not a JSON object")
    data = doc.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise BadEvent("the event has no data.object")
    included = _list(data.get("included"))
    return _timestamp(doc.get("created_at")), data["object"], [r for r in included if isinstance(r, dict)]


def _apply_order(conn: Connection, obj: dict, included: list, when: datetime, out: ApplySummary) -> str:
    oid = obj.get("id")
    if not oid or str(obj.get("type", "order")) not in ("order", "orders"):
        raise BadEvent("data.object is not an order")
    oid = str(oid)
    now = datetime.now(UTC)
    attrs = _dict(obj.get("attributes"))
    rels = _dict(obj.get("relationships"))
    stored = conn.execute(sa.select(rupa_orders.c.event_created_at).where(rupa_orders.c.id == oid)).scalar()
    result = STALE
    intent_id = _rel_id(obj, "order_intent")
    if _newer(stored, when):
        row = dict(id=oid, status=_str(attrs.get("status"), 100), patient_id=_rel_id(obj, "patient"),
                   order_intent_id=intent_id,
                   date_submitted=_timestamp(attrs.get("date_submitted")), date_paid=_timestamp(attrs.get("date_paid")),
                   date_completed=_timestamp(attrs.get("date_completed")),
                   date_canceled=_timestamp(attrs.get("date_canceled")), payer=_str(attrs.get("payer"), 100),
                   total_price=_str(attrs.get("total_price"), 40), attributes=attrs, relationships=rels,
                   event_created_at=when, first_seen_at=now, updated_at=now)
        upsert(conn, rupa_orders, [row], key=["id"], update=[c for c in row if c not in ("id", "first_seen_at")])
        out.orders += 1
        result = APPLIED
    for res in included:
        kind = str(res.get("type") or "")
        if kind in ("ordered_test", "ordered_tests", "orderedtest") and res.get("id"):
            if _apply_ordered_test(conn, res, oid, when, now):
                out.ordered_tests += 1
                result = APPLIED
        elif kind == "patient" and res.get("id"):
            _apply_copy(conn, "patients", res, when, revive=False)
        elif kind in ("lab_test", "labtest") and res.get("id"):
            _apply_copy(conn, "lab_tests", res, when, revive=False)
    if intent_id:
        _link_intent(conn, order_id=oid, order_intent_id=intent_id)
    return result


def _apply_ordered_test(conn: Connection, res: dict, order_id: str, when: datetime, now: datetime) -> bool:
    tid = str(res["id"])
    attrs = _dict(res.get("attributes"))
    cur = conn.execute(sa.select(rupa_ordered_tests.c.event_created_at, rupa_ordered_tests.c.results_pdf_url,
                                 rupa_ordered_tests.c.results_hl7_url, rupa_ordered_tests.c.results_pending)
                       .where(rupa_ordered_tests.c.id == tid)).mappings().first()
    if cur is not None and not _newer(cur["event_created_at"], when):
        return False
    pdf, hl7 = _link(attrs.get("results_pdf")), _link(attrs.get("results_hl7"))
    pending = int(bool(cur and cur["results_pending"]))
    if (pdf and (cur is None or not _same_link(pdf, cur["results_pdf_url"]))) or \
            (hl7 and (cur is None or not _same_link(hl7, cur["results_hl7_url"]))):
        pending = 1  # a link we have not downloaded from yet
    row = dict(id=tid, order_id=_rel_id(res, "order") or order_id, lab_test_id=_rel_id(res, "lab_test"),
               date_results_received_from_lab=_timestamp(attrs.get("date_results_received_from_lab")),
               attributes=_without_links(attrs), relationships=res.get("relationships") or {},
               results_pdf_url=pdf or (cur["results_pdf_url"] if cur else None),
               results_hl7_url=hl7 or (cur["results_hl7_url"] if cur else None),
               results_pending=pending, results_attempts=0, results_error=None,
               event_created_at=when, first_seen_at=now, updated_at=now)
    update = [c for c in row if c not in ("id", "first_seen_at", "results_attempts")]
    upsert(conn, rupa_ordered_tests, [row], key=["id"], update=update)
    return True


# A result link is a bearer credential to a patient's results: once its file is stored, only its
# digest is kept (enough to know a repeated event brings nothing new).
USED_LINK = "sha256:"


def _spent(url: str) -> str:
    return USED_LINK + hashlib.sha256(url.encode()).hexdigest()


def _same_link(url: str, stored: str | None) -> bool:
    return stored is not None and (stored == url or stored == _spent(url))


def _without_links(attrs: dict) -> dict:
    """The attributes as stored in JSON: result links (short-lived, possibly signed) left out;
    they live in their own columns, never shown."""
    return {k: ("<link>" if k in ("results_pdf", "results_hl7", "requisition") and v else v)
            for k, v in attrs.items()}


def _apply_copy(conn: Connection, stream: str, res: dict, when: datetime | None, *, revive: bool = True) -> str:
    """patient.* / labtest.* (and patients or lab tests included in order events): the
    extraction's row, unless the stored one is newer (by the resource's own updated_at). Only a
    patient/labtest event brings back a row extraction marked deleted (`revive`); a copy riding
    along in an order event leaves `deleted_at` as it is."""
    spec = STREAMS[stream]
    row = row_dict(spec, res)
    table = spec.table
    stored = conn.execute(sa.select(table.c.updated_at).where(table.c.id == row["id"])).first()
    incoming = row["updated_at"] or when
    stored_at = _aware(stored[0]) if stored is not None else None
    if stored_at is not None and incoming is not None and stored_at > incoming:
        return STALE
    now = datetime.now(UTC)
    full = {**row, "first_seen_at": now, "last_seen_at": now, "deleted_at": None}
    keep = ("id", "first_seen_at") if revive else ("id", "first_seen_at", "deleted_at")
    upsert(conn, table, [full], key=["id"], update=[c for c in full if c not in keep])
    return APPLIED


def _link_intent(conn: Connection, *, order_id: str, order_intent_id: str | None = None,
                 row_id: str | None = None) -> bool:
    """Record `order_id` on its intents row. By order intent (Rupa's order event, signed by Rupa):
    the row's order is set. By row id (the practitioner's return, whose `order=` only Rupa's
    redirect vouches for): only a row with no order yet gets it; a row already linked to another
    order is left as it is (False: a conflict, logged)."""
    t = rupa_order_intents
    now = datetime.now(UTC)
    if order_intent_id:
        conn.execute(sa.update(t).where(t.c.order_intent_id == order_intent_id,
                                        sa.or_(t.c.order_id.is_(None), t.c.order_id != order_id))
                     .values(order_id=order_id, updated_at=now))
        return True
    cur = conn.execute(sa.select(t.c.order_id, t.c.order_intent_id).where(t.c.row_id == row_id)).first()
    if cur is None:
        return True  # no such row (yet): nothing to link
    linked, intent = cur
    if linked is not None and linked != order_id:
        log.warning("rupa events: a checkout return for row %s names order %s, but the row is linked to "
                    "order %s; left as it is", row_id, order_id, linked)
        return False
    known = conn.execute(sa.select(rupa_orders.c.order_intent_id).where(rupa_orders.c.id == order_id)).first()
    if known is not None and known[0] and intent and known[0] != intent:
        log.warning("rupa events: a checkout return for row %s names order %s, which Rupa made from "
                    "another order intent; left as it is", row_id, order_id)
        return False
    if linked is None:
        conn.execute(sa.update(t).where(t.c.row_id == row_id, t.c.order_id.is_(None))
                     .values(order_id=order_id, updated_at=now))
    if intent:
        conn.execute(sa.update(rupa_orders).where(rupa_orders.c.id == order_id,
                                                  rupa_orders.c.order_intent_id.is_(None))
                     .values(order_intent_id=intent))
    return True


def _dict(value: object) -> dict:
    """A JSON member that should be an object, else empty (the network decides nothing)."""
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list:
    return value if isinstance(value, list) else []


def _str(value, limit: int) -> str | None:
    return None if value is None else str(value)[:limit]


def _document(event: store.Event):
    try:
        return event.json()
    except (ValueError, RecursionError) as exc:  # the reason names no content (etl.webhooks.store.Event.json)
        deep = isinstance(exc, RecursionError) or "too deeply" in str(exc)
        raise BadEvent("the body is nested too deeply to read" if deep else "the body is not JSON") from None


def named_resource(event: store.Event) -> tuple[str, str] | None:
    """(stream, id) for an event Rupa's API can confirm (CONFIRMED_BY_GET), else None; BadEvent
    when such an event names no id."""
    stream = CONFIRMED_BY_GET.get((event.event_type or "").lower())
    if stream is None:
        return None
    _, obj, _ = _envelope(_document(event))
    rid = obj.get("id")
    if not isinstance(rid, str | int) or not str(rid).strip():
        raise BadEvent("the event names no resource id")
    return stream, str(rid).strip()


def confirm_resource(client, stream: str, resource_id: str) -> dict | None:
    """Rupa's own copy of what an event names (GET /patients/{id}, /lab_tests/{id}); None if Rupa
    does not know it (404/410). ApiError when Rupa cannot be asked now (the event is retried);
    BadEvent for an id that cannot travel in a URL."""
    from etl.errors import RupaApiError, UnsafeIdError

    try:
        path = client.path(STREAMS[stream].path.strip("/"), resource_id)
    except UnsafeIdError:
        raise BadEvent("the event names a resource id that cannot be sent in a URL") from None
    try:
        doc = client.request("GET", path)
    except RupaApiError as exc:
        if exc.status in (404, 410):
            return None
        raise
    data = doc.get("data")
    if not isinstance(data, dict) or str(data.get("id")) != resource_id:
        raise BadEvent(f"Rupa's answer for the {stream} resource the event names is not that resource")
    return data


def apply_event(conn: Connection, event: store.Event, out: ApplySummary, *,
                confirmed: dict | None = None) -> str:
    """Apply one stored event inside `conn`'s transaction; returns applied / stale / ignored /
    unauthenticated / not known to Rupa. `confirmed`: Rupa's answer for the resource a
    CONFIRMED_BY_GET event names (what is written; the event's body never is)."""
    doc = _document(event)
    kind = (event.event_type or "").lower()
    if kind in CONFIRMED_BY_GET:
        if confirmed is None:
            return UNKNOWN
        return _apply_copy(conn, CONFIRMED_BY_GET[kind], confirmed, None)
    if not event.authenticated and (kind == RETURN_EVENT or kind.startswith("order.")):
        return UNAUTHENTICATED
    if kind == RETURN_EVENT:
        order_id, row_id = str(doc.get("order") or ""), str(doc.get("row_id") or "")
        if not order_id.startswith("ord_") or not row_id:
            raise BadEvent("a checkout return without an order id or row_id")
        _link_intent(conn, order_id=order_id, row_id=row_id)  # never moves a row already linked
        return APPLIED
    if kind.startswith("order."):
        when, obj, included = _envelope(doc)
        return _apply_order(conn, obj, included, when or _aware(event.received_at) or datetime.now(UTC), out)
    return IGNORED


# ---- results --------------------------------------------------------------------------------------
# A result link comes from an event, that is from outside: it is fetched only from Rupa's own
# origins (RUPA_BASE_URL's, and those RUPA_RESULT_ORIGINS adds), over https (plain http only to
# the local sandbox on loopback), redirects followed one hop at a time (at most MAX_REDIRECTS),
# each to an allowed origin, over a connection whose address is checked when it opens (no
# loopback, private, link-local or metadata address but the configured API's own), into a
# temporary file under RUPA_MAX_RESPONSE_BYTES on the wire and decoded (etl.http). A refused link
# is never fetched: the download stays pending with the reason (the origin at most, never the
# link's path or query).
RESULT_ACCEPT = {"Accept": "*/*", "Accept-Encoding": "gzip"}


def result_policy(settings: Settings) -> OriginPolicy:
    """Where result files may come from: RUPA_BASE_URL's origin and RUPA_RESULT_ORIGINS."""
    return OriginPolicy.of(settings.rupa.base_url, settings.rupa.result_origins, setting="RUPA_RESULT_ORIGINS")


def _fetch(http: httpx.Client, policy: OriginPolicy, url: httpx.URL, what: str, limit: int) -> Download:
    """One try: the link, then each redirect it answers with (checked before it is followed)."""
    for _hop in range(MAX_REDIRECTS + 1):
        with http.stream("GET", url, headers=RESULT_ACCEPT, follow_redirects=False) as response:
            raise_for_retryable(response)
            if response.status_code in (301, 302, 303, 307, 308):
                location = response.headers.get("location")
                if not location:
                    raise DownloadFailed(f"the {what} download answered HTTP {response.status_code} without a Location")
                try:
                    target = url.join(location)
                except httpx.InvalidURL:
                    raise DownloadFailed(f"the {what} link redirects to something that is not a URL") from None
                try:
                    url = policy.check(target)
                except Refused as exc:
                    raise DownloadFailed(f"the {what} link redirects where labsync does not follow: {exc}") from None
                continue
            if response.status_code in (401, 403, 404, 410):
                raise DownloadFailed(f"the {what} link has expired or is gone (HTTP {response.status_code})")
            if response.status_code >= 300:
                raise DownloadFailed(f"the {what} download answered HTTP {response.status_code}")
            try:
                return download_to_file(response, limit)
            except Refused as exc:  # an encoding not decoded here
                raise DownloadFailed(f"the {what} download {exc}") from None
            except OverCap:
                from etl.errors import size_text

                raise DownloadFailed(f"the {what} file is larger than {size_text(limit)} "
                                     "(RUPA_MAX_RESPONSE_BYTES); not stored") from None
    raise DownloadFailed(f"the {what} link redirects more than {MAX_REDIRECTS} times")


def _download(http: httpx.Client, settings: Settings, policy: OriginPolicy, url: str, what: str) -> Download:
    """The file behind one result link, in a temporary file (the caller closes it), or
    DownloadFailed saying why without the link."""
    try:
        checked = policy.check(url)
    except Refused as exc:
        raise DownloadFailed(f"the {what} link was refused: {exc}") from None
    try:
        for attempt in retrying(settings.retry):
            with attempt:
                return _fetch(http, policy, checked, what, settings.rupa.max_response_bytes)
    except Refused as exc:  # the address check, when the connection opened
        raise DownloadFailed(f"the {what} link was refused: {exc}") from None
    except (RetryableStatus, httpx.TransportError) as exc:
        raise DownloadFailed(f"the {what} download failed: {describe_transport_error(exc)}") from None
    except httpx.HTTPError as exc:
        raise DownloadFailed(f"the {what} download failed ({type(exc).__name__})") from None
    raise DownloadFailed(f"the {what} download failed")  # pragma: no cover - retrying re-raises


def download_results(engine: Engine, settings: Settings, out: ApplySummary, *,
                     http: httpx.Client | None = None) -> None:
    """Every ordered test with a result link still to download: fetch (only from the allowed
    origins, see above), store by sha256. `http`: a client to use instead of the checked one
    labsync builds (its connections are then the caller's; the origin and redirect checks hold)."""
    t = rupa_ordered_tests
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.id, t.c.order_id, t.c.results_pdf_url, t.c.results_hl7_url)
                            .where(t.c.results_pending == 1).order_by(t.c.id)).mappings().all()
    pending = [{**r, **{c: None for c in ("results_pdf_url", "results_hl7_url")
                        if (r[c] or "").startswith(USED_LINK)}} for r in rows]  # already stored
    if not pending:
        return
    policy = result_policy(settings)
    own = http is None
    http = http or make_checked_client(policy, settings.retry, settings.rupa.network)
    try:
        for test in pending:
            errors = []
            done: dict[str, str] = {}  # url column -> the link whose file is now stored
            for kind, column in RESULT_KINDS.items():
                url = test[f"{column}_url"]
                if not url:
                    continue
                try:
                    download = _download(http, settings, policy, url, column)
                except DownloadFailed as exc:
                    errors.append(str(exc))
                    continue
                try:
                    content = download.read()
                finally:
                    download.close()
                with engine.begin() as conn:
                    new = conn.execute(_results_insert(conn).values(
                        ordered_test_id=test["id"], order_id=test["order_id"], kind=kind, sha256=download.sha256,
                        size=download.size, content_type=(download.content_type or "")[:100] or None,
                        content=content, stored_at=datetime.now(UTC)).returning(rupa_results.c.id)).scalar()
                done[f"{column}_url"] = url
                if new is not None:
                    out.results_stored += 1
                    if kind == "hl7":  # its observations into lab_observations (issue 26)
                        observations.record_rupa(engine, new)
                    log.debug("rupa results: stored the %s of ordered test %s (order %s)", kind, test["id"], test["order_id"])
                else:
                    out.results_repeated += 1
            with engine.begin() as conn:
                conn.execute(sa.update(t).where(t.c.id == test["id"]).values(
                    results_pending=1 if errors else 0, results_error="; ".join(errors)[:500] or None,
                    results_attempts=t.c.results_attempts + 1))
                for column, url in done.items():  # a stored file's link is kept only as its digest
                    conn.execute(sa.update(t).where(t.c.id == test["id"], t.c[column] == url)
                                 .values({column: _spent(url)}))
            if errors:
                out.downloads_failed += 1
                log.warning("rupa results: ordered test %s (order %s): %s; tried again next run",
                            test["id"], test["order_id"], "; ".join(errors))
    finally:
        if own:
            http.close()


def _results_insert(conn: Connection):
    from sqlalchemy.dialects import postgresql, sqlite

    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    return insert(rupa_results).on_conflict_do_nothing(index_elements=["ordered_test_id", "kind", "sha256"])


# ---- the task ---------------------------------------------------------------------------------------
def apply_events(engine: Engine, settings: Settings, *, limit: int = 1000, download: bool = True,
                 http: httpx.Client | None = None) -> ApplySummary:
    """Apply every pending Rupa event (oldest first, in pages of `limit`), then download results."""
    out = ApplySummary()
    done: set[int] = set()
    clients: list = []  # the Rupa client, opened for the first event that names a resource

    def rupa():
        if not clients:
            from etl.rupa.client import open_client

            clients.append(open_client(settings, engine))
        return clients[0]

    try:
        _apply_pages(engine, out, done, limit, rupa)
    finally:
        for c in clients:
            c.close()
    if download:
        download_results(engine, settings, out, http=http)
    log.info("%s", out.line())
    return out


def _apply_pages(engine: Engine, out: ApplySummary, done: set[int], limit: int, rupa) -> None:
    while True:
        events = [e for e in store.pending_events(engine, SOURCE, limit=limit, max_attempts=MAX_ATTEMPTS)
                  if e.id not in done]
        if not events:
            break
        marks: list[tuple[int, str, str | None]] = []
        for event in events:
            done.add(event.id)
            try:
                named = named_resource(event)
                confirmed = confirm_resource(rupa(), *named) if named else None
                with engine.begin() as conn:
                    result = apply_event(conn, event, out, confirmed=confirmed)
            except ApiError as exc:  # Rupa could not be asked now (PHI-free: etl.rupa.client)
                marks.append((event.id, WebhookEventState.FAILED, f"not confirmed with Rupa: {exc}"))
                out.events[FAILED] += 1
                log.warning("rupa events: event %d (%s) not confirmed with Rupa: %s; retried next run",
                            event.id, event.event_type, exc)
                continue
            except BadEvent as exc:
                marks.append((event.id, WebhookEventState.FAILED, str(exc)))
                out.events[FAILED] += 1
                log.warning("rupa events: event %d (%s) cannot be applied: %s", event.id, event.event_type, exc)
                continue
            except sa.exc.SQLAlchemyError as exc:
                marks.append((event.id, WebhookEventState.FAILED, f"warehouse error ({type(exc).__name__})"))
                out.events[FAILED] += 1
                log.warning("rupa events: event %d (%s): warehouse error (%s); retried next run",
                            event.id, event.event_type, type(exc).__name__)
                continue
            except RecursionError:  # a document nested too deeply for a step that walks it (JSON columns)
                marks.append((event.id, WebhookEventState.FAILED, "the event is nested too deeply to apply"))
                out.events[FAILED] += 1
                log.warning("rupa events: event %d (%s) cannot be applied: nested too deeply",
                            event.id, event.event_type)
                continue
            out.events[result] += 1
            state = (WebhookEventState.IGNORED if result in (IGNORED, UNAUTHENTICATED, UNKNOWN)
                     else WebhookEventState.APPLIED)
            marks.append((event.id, state, _REASONS.get(result)))
        store.mark_events(engine, marks)
        if len(events) < limit:
            break
