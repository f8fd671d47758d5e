"""The LetsGetChecked sandbox after the PUT: order items move through the lifecycle, kits get
barcodes, results appear, PATCH cancels, and signed webhooks go out.

    Submitted -> Created -> KitDispatched -> KitRegistered -> KitArrivedAtLab -> ResultsAvailable
    Submitted -> ValidationFailed            (advance with "to": "ValidationFailed")
    up to KitRegistered -> Cancelled        (only by PATCH; applied asynchronously)

- **Moving on**: automatically with time (`auto_step_seconds` > 0: one step per item per that many
  seconds) and on command (`advance(...)`, `POST /_sandbox/lgc/advance` with optional
  `client_order_id`, `item_id`, `steps`, `to`).
- **What appears**: an outbound tracking number at KitDispatched, the barcode
  (`LGC-0000-0000-0000`) and alpha code at KitRegistered, an inbound tracking number at
  KitArrivedAtLab, results (JSON and an HL7 2.3 ORU^R01 message) at ResultsAvailable; before that
  the results endpoints answer 404.
- **Cancel**: PATCH answers 202 and the item becomes Cancelled at its next step (`advance`, or an
  automatic one), or `cancel_delay` seconds later when that is set; from KitArrivedAtLab on it
  answers 409.
- **Webhooks** (`webhook_url` set): every transition is POSTed as LetsGetChecked documents it
  (`{"type": "order", "body": {clientOrderId, callbackURL, orderItemStatus: {id, status: {code}},
  timestamp}}`, plus a `Result` event at ResultsAvailable), signed with `webhook_key` like
  LetsGetChecked signs (`Authorization: LGC2-HMAC-SHA256 base64(HMAC-SHA256(key's ASCII bytes,
  body))`), retried on 5xx/401/403/connection errors `retries` times. Switches: `duplicates`
  (every event sent twice), `reorder` (the events of one step batch sent newest first),
  `drop` (lose the next N events for good), `order_type`/`result_type` (the type's casing),
  `status_shape` (`object` `{"code": …}` or `string`, in GET answers and events).

Written independently of labsync's clients (it shares no code with etl.lgc or etl.webhooks), so
the tests can catch the client's mistakes. A daemon thread does the timed work and sends
webhooks; it runs only while there is something to do.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

SUBMITTED, CREATED, DISPATCHED, REGISTERED = "Submitted", "Created", "KitDispatched", "KitRegistered"
AT_LAB, RESULTS, VALIDATION_FAILED, CANCELLED = "KitArrivedAtLab", "ResultsAvailable", "ValidationFailed", "Cancelled"
PATH = (SUBMITTED, CREATED, DISPATCHED, REGISTERED, AT_LAB, RESULTS)
FINAL = {RESULTS, VALIDATION_FAILED, CANCELLED}
CANCELLABLE = {SUBMITTED, CREATED, DISPATCHED, REGISTERED}
RESULT_STATUS = {REGISTERED: "Activation completed", AT_LAB: "SampleAtLab", RESULTS: "ResultsAvailable",
                 CANCELLED: "Cancelled"}

# biomarker panels per kit code (synthetic): name, kind, unit, low, high, LOINC, test code
PANELS: dict[str, list[tuple]] = {
    "GLCS": [("Hemoglobin A1c", "Quantitative", "%", 4.0, 5.6, "4548-4", "001453"),
             ("Glucose, Fasting", "Quantitative", "mg/dL", 70.0, 99.0, "1558-6", "001818")],
    "FCIT": [("Fecal Immunochemical Test", "Qualitative", None, None, None, "29771-3", "182949")],
}
DEFAULT_PANEL = [("Cholesterol, Total", "Quantitative", "mg/dL", 100.0, 199.0, "2093-3", "001065"),
                 ("HDL Cholesterol", "Quantitative", "mg/dL", 39.0, 90.0, "2085-9", "011817"),
                 ("Chlamydia trachomatis", "Qualitative", None, None, None, "43304-5", "183194")]

SWITCHES = {"auto_step_seconds", "cancel_delay", "webhook_url", "webhook_key", "duplicates", "reorder",
            "drop", "retries", "retry_wait", "order_type", "result_type", "status_shape", "seed", "letters"}


@dataclass
class LifecycleConfig:
    auto_step_seconds: float = 0.0  # 0: items move only on command
    cancel_delay: float | None = None  # seconds from a PATCH to Cancelled; None: at the next step
    webhook_url: str | None = None
    webhook_key: str | None = None  # base64 text; signs with its ASCII bytes, as LetsGetChecked does
    duplicates: bool = False
    reorder: bool = False
    drop: int = 0  # lose the next N events for good
    retries: int = 3  # LetsGetChecked: 3 quick tries, then 15-minute rounds for about an hour
    retry_wait: float = 0.05
    order_type: str = "order"
    result_type: str = "Result"
    status_shape: str = "object"  # object | string
    seed: int = 0
    letters: str = ""  # results letters sent by themselves at ResultsAvailable: "patient,pcp", "patient", ""


@dataclass
class Item:
    id: str
    code: str
    status: str
    created_at: datetime
    updated_at: datetime
    moved_at: float  # time.monotonic() of the last transition (for auto steps)
    barcode: str | None = None
    alpha_code: str | None = None
    outbound: str | None = None
    inbound: str | None = None
    cancel_due: float | None = None  # a PATCHed cancel applies at this monotonic time
    history: list[tuple[str, datetime]] = field(default_factory=list)


@dataclass
class Order:
    client_order_id: str
    client_id: str
    base: str  # ".../lgc/{clientId}" as the PUT saw it, for callback URLs
    participant_id: str
    patient: dict
    items: list[Item]
    program: str = ""  # programCode of the PUT (the Outreach API lists notifications per program)


@dataclass
class Letter:
    """A results letter of the Outreach API: `<audience>_<barcode>`, sent (DeliverySent)."""

    letter_id: str
    barcode: str
    type: str  # PatientResultsLetter | PcpResultsLetter
    status: str
    timestamp: datetime
    event_id: int  # its place in the letters feed
    program: str
    pdf: bytes


LETTER_TYPES = {"patient": "PatientResultsLetter", "pcp": "PcpResultsLetter"}


def parse_iso(text: str | None) -> datetime | None:
    """An ISO 8601 time from a query string (None when absent); naive means UTC."""
    if not text:
        return None
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"  # seven digits, like LGC


class LgcLifecycle:
    """Items, results and webhooks of the LetsGetChecked sandbox (thread-safe)."""

    def __init__(self) -> None:
        self.config = LifecycleConfig()
        self.orders: dict[str, Order] = {}
        self.sent: list[dict] = []  # every delivery attempt: {"type", "status", "code", "attempt"}
        self.delivered = 0  # events answered 2xx
        self.lost = 0  # events dropped on purpose or given up after retries
        self._outbox: deque[bytes] = deque()
        self._timed: set[tuple[str, str]] = set()  # (order, item) with a cancel due at a set time
        self._barcodes: dict[str, tuple[str, str]] = {}  # barcode -> (order, item)
        self._rng = random.Random(0)
        self._lock = threading.RLock()
        self._last_ts = datetime.now(UTC)
        self.clock: datetime | None = None  # set_clock: the vendor's time, pinned
        self.letters: dict[str, Letter] = {}  # letter id -> letter (the Outreach API)
        self.letter_feed: list[str] = []  # letter ids in feed order (event id = position + 1)
        self._thread: threading.Thread | None = None
        self._sending = False
        self._idle = threading.Condition(self._lock)

    # ---- knobs ---------------------------------------------------------------------------
    def configure(self, **changes: Any) -> dict:
        with self._lock:
            for key, value in changes.items():
                if key not in SWITCHES:
                    raise ValueError(f"unknown lifecycle switch {key!r}")
                setattr(self.config, key, value)
            if "seed" in changes:
                self._rng = random.Random(self.config.seed)
            if self.config.status_shape not in ("object", "string"):
                raise ValueError("status_shape must be object or string")
        self._kick()
        return self.as_dict()

    def as_dict(self) -> dict:
        with self._lock:
            cfg = {k: getattr(self.config, k) for k in SWITCHES}
            cfg["webhook_key"] = "***" if cfg["webhook_key"] else None
            return {**cfg, "delivered": self.delivered, "lost": self.lost, "queued": len(self._outbox),
                    "orders": len(self.orders)}

    def reset(self) -> None:
        with self._lock:
            self.config = LifecycleConfig()
            self.orders.clear()
            self._timed.clear()
            self._barcodes.clear()
            self.sent.clear()
            self._outbox.clear()
            self.delivered = self.lost = 0
            self.clock = None
            self.letters.clear()
            self.letter_feed.clear()

    # ---- the clock: strictly increasing vendor timestamps -------------------------------
    def set_clock(self, when: datetime | None) -> None:
        """Pin the vendor's clock (tests choose when each transition happens; None: real time).
        While pinned, every timestamp is exactly `when`."""
        with self._lock:
            self.clock = when

    def _now(self) -> datetime:
        if self.clock is not None:
            return self.clock
        now = datetime.now(UTC)
        self._last_ts = now if now > self._last_ts else self._last_ts + timedelta(microseconds=1)
        return self._last_ts

    # ---- orders ---------------------------------------------------------------------------
    def order_accepted(self, client_order_id: str, client_id: str, base: str, body: dict,
                       order_items: list[dict]) -> None:
        """The PUT created an order: its items start at Submitted."""
        with self._lock:
            now, mono = self._now(), time.monotonic()
            items = [Item(i["id"], i["code"], SUBMITTED, now, now, mono, history=[(SUBMITTED, now)])
                     for i in order_items]
            patient = body.get("patientInfo") or {}
            self.orders[client_order_id] = Order(client_order_id, client_id, base,
                                                 str(patient.get("participantId") or ""), patient, items,
                                                 str(body.get("programCode") or ""))
        self._kick()

    def item(self, client_order_id: str, item_id: str | None = None) -> Item:
        with self._lock:
            items = self.orders[client_order_id].items
            return next(i for i in items if item_id is None or i.id == item_id)

    def _status(self, code: str) -> Any:
        return code if self.config.status_shape == "string" else {"code": code}

    def order_json(self, client_order_id: str) -> dict | None:
        """GET Order v2's answer, or None for an unknown order."""
        self._due()
        with self._lock:
            order = self.orders.get(client_order_id)
            if order is None:
                return None
            return {
                "clientOrderId": order.client_order_id,
                "participantId": order.participant_id,
                "orderItems": [{
                    "code": i.code, "id": i.id, "replacementOrderItemId": None,
                    "createdAt": _iso(i.created_at), "updatedAt": _iso(i.updated_at),
                    "status": self._status(i.status),
                    "lgcKitIdentifier": ({"numericalCode": i.barcode, "alphaCode": i.alpha_code}
                                         if i.barcode else None),
                    "shipment": {"OutboundTrackingNumber": i.outbound, "InboundTrackingNumber": i.inbound},
                } for i in order.items],
            }

    # ---- transitions ----------------------------------------------------------------------
    def _move(self, order: Order, item: Item, status: str, events: list[bytes]) -> dict:
        now = self._now()
        item.status, item.updated_at, item.moved_at = status, now, time.monotonic()
        item.history.append((status, now))
        n = int(hashlib.sha256(item.id.encode()).hexdigest()[:12], 16)
        if status == DISPATCHED:
            item.outbound = f"1Z{n % 10**16:016d}"
        elif status == REGISTERED:
            digits = f"{n % 10**12:012d}"
            item.barcode = f"LGC-{digits[:4]}-{digits[4:8]}-{digits[8:]}"
            self._barcodes[item.barcode] = (order.client_order_id, item.id)
            item.alpha_code = "".join(chr(65 + (n >> (5 * k)) % 26) for k in range(6))
        elif status == AT_LAB:
            item.inbound = f"9400{n % 10**18:018d}"
        events.append(self._order_event(order, item, now))
        if status == RESULTS:
            events.append(self._result_event(order, item, now))
            for audience in filter(None, (a.strip() for a in self.config.letters.split(","))):
                events.extend(self._letter(order, item, audience))
        return {"client_order_id": order.client_order_id, "item_id": item.id, "status": status}

    def _order_event(self, order: Order, item: Item, now: datetime) -> bytes:
        doc = {"type": self.config.order_type, "body": {
            "clientOrderId": order.client_order_id,
            "callbackURL": f"{order.base}/api/v2/orders/{order.client_order_id}",
            "orderItemStatus": {"id": item.id, "status": self._status(item.status)},
            "timestamp": _iso(now)}}
        return json.dumps(doc, separators=(",", ":")).encode()

    def _result_event(self, order: Order, item: Item, now: datetime) -> bytes:
        doc = {"type": self.config.result_type, "body": {
            "barcode": item.barcode, "alphaCode": item.alpha_code,
            "callbackURL": f"{order.base}/api/v1/results/{item.barcode}?alphaCode={item.alpha_code}&fields=status",
            "timestamp": _iso(now)}}
        return json.dumps(doc, separators=(",", ":")).encode()

    def _next(self, item: Item, to: str | None) -> str | None:
        if item.status in FINAL:
            return None
        if to == VALIDATION_FAILED:
            return VALIDATION_FAILED if item.status == SUBMITTED else None
        if to is not None and (to not in PATH or PATH.index(to) <= PATH.index(item.status)):
            return None
        return PATH[PATH.index(item.status) + 1]

    def advance(self, client_order_id: str | None = None, item_id: str | None = None, *,
                steps: int = 1, to: str | None = None) -> list[dict]:
        """Move items on: `steps` steps each, or (with `to`) as far as that status, one event
        per status passed. A PATCHed cancel waiting on an item is applied first, instead."""
        if to is not None and to not in PATH and to != VALIDATION_FAILED:
            raise ValueError(f"cannot advance to {to!r} (Cancelled only by PATCH)")
        moved: list[dict] = []
        events: list[bytes] = []
        with self._lock:
            if client_order_id is not None and client_order_id not in self.orders:
                raise KeyError(client_order_id)
            orders = [self.orders[client_order_id]] if client_order_id else list(self.orders.values())
            for order in orders:
                for item in order.items:
                    if item_id is not None and item.id != item_id:
                        continue
                    if item.cancel_due is not None:
                        item.cancel_due = None
                        self._timed.discard((order.client_order_id, item.id))
                        moved.append(self._move(order, item, CANCELLED, events))
                        continue
                    budget = steps if to is None else len(PATH)
                    while budget > 0 and (status := self._next(item, to)) is not None:
                        moved.append(self._move(order, item, status, events))
                        budget -= 1
                        if status == to:
                            break
            self._queue(events)
        self._kick()
        return moved

    def cancel(self, client_order_id: str, item_id: str) -> tuple[int, str]:
        """A PATCH: (202, "") when it will be applied, (404|409, reason) otherwise."""
        with self._lock:
            order = self.orders.get(client_order_id)
            item = next((i for i in order.items if i.id == item_id), None) if order else None
            if item is None:
                return 404, "unknown order item"
            if item.status == CANCELLED:
                return 202, ""
            if item.status not in CANCELLABLE:
                return 409, f"the order item is {item.status} and can no longer be cancelled"
            delay = self.config.cancel_delay
            item.cancel_due = time.monotonic() + delay if delay is not None else float("inf")
            if delay is not None:
                self._timed.add((client_order_id, item_id))
        self._kick()
        return 202, ""

    def _due(self) -> None:
        """Apply what time has made due: PATCHed cancels and automatic steps."""
        events: list[bytes] = []
        with self._lock:
            mono = time.monotonic()
            step = self.config.auto_step_seconds
            if step <= 0 and not self._timed:
                return  # nothing is timed: no need to look at every item
            for order in self.orders.values():
                for item in order.items:
                    if item.status in FINAL:
                        continue
                    stepping = step > 0 and mono - item.moved_at >= step
                    if item.cancel_due is not None and (item.cancel_due <= mono or stepping):
                        item.cancel_due = None
                        self._timed.discard((order.client_order_id, item.id))
                        self._move(order, item, CANCELLED, events)
                    elif stepping:
                        status = self._next(item, None)
                        if status is not None:
                            self._move(order, item, status, events)
            self._queue(events)

    # ---- results -------------------------------------------------------------------------
    def _find(self, barcode: str) -> tuple[Order, Item] | None:
        where = self._barcodes.get(barcode)
        if where is None:
            return None
        order = self.orders[where[0]]
        return order, next(i for i in order.items if i.id == where[1])

    def results(self, barcode: str, alpha_code: str | None) -> tuple[Order, Item] | None:
        """The order and item whose results are released under this barcode (alpha code
        checked when given), else None."""
        self._due()
        with self._lock:
            found = self._find(barcode)
            if found is None or (alpha_code and alpha_code != found[1].alpha_code):
                return None
            return found

    def result_status(self, barcode: str, alpha_code: str | None) -> str | None:
        self._due()
        with self._lock:
            found = self._find(barcode)
            if found is None or (alpha_code and alpha_code != found[1].alpha_code):
                return None
            return RESULT_STATUS.get(found[1].status)

    @staticmethod
    def panel(item: Item) -> list[dict]:
        """The item's synthetic results, deterministic per item id."""
        out = []
        for k, (name, kind, unit, low, high, loinc, test_code) in enumerate(PANELS.get(item.code, DEFAULT_PANEL)):
            n = int(hashlib.sha256(f"{item.id}:{k}".encode()).hexdigest()[:8], 16)
            entry: dict[str, Any] = {"biomarkerName": name, "kind": kind, "testCode": test_code,
                                     "coding": [{"system": "http://loinc.org", "code": loinc, "display": name}]}
            if kind == "Quantitative":
                value = round(low * 0.8 + (high * 1.2 - low * 0.8) * (n % 10_000) / 10_000, 2)
                descriptor = "Low" if value < low else "High" if value > high else "Normal"
                entry.update(quantitativeValue=value, unitOfMeasure=unit, lowerBound=low, upperBound=high)
            else:
                value = "Detected" if n % 5 == 0 else "Not Detected"
                descriptor = value
                entry.update(qualitativeValue=value)
            entry.update(descriptor=descriptor, headline=f"Your {name} result is {descriptor.lower()}",
                         description=f"{name}: {descriptor}. Reported by the LetsGetChecked sandbox lab.")
            out.append(entry)
        return out

    def results_json(self, item: Item) -> bytes:
        return json.dumps({"testResults": self.panel(item)}, separators=(",", ":")).encode()

    def results_hl7(self, order: Order, item: Item) -> bytes:
        """An HL7 2.3 ORU^R01 message, segments separated by CR, like a lab sends."""
        p = order.patient
        stamp = item.updated_at.strftime("%Y%m%d%H%M")
        dob = str(p.get("dob") or "").replace("-", "")
        sex = {"male": "M", "female": "F"}.get(str(p.get("gender") or "").lower(), "U")
        segments = [
            f"MSH|^~\\&|LGC|LGCLAB|{order.client_id}||{stamp}||ORU^R01|{item.id[:20]}|P|2.3",
            f"PID|||{order.participant_id}||{p.get('lastName', '')}^{p.get('firstName', '')}||{dob}|{sex}",
            f"PV1|1||{order.client_id}",
            f"ORC|RE|{item.barcode}|{item.id}||F",
            f"OBR|1|{item.barcode}|{item.id}|{item.code}|||{stamp}",
        ]
        for k, r in enumerate(self.panel(item), start=1):
            if r["kind"] == "Quantitative":
                flag = {"Low": "L", "High": "H"}.get(r["descriptor"], "")
                segments.append(f"OBX|{k}|NM|{r['testCode']}^{r['biomarkerName']}^^{r['coding'][0]['code']}^^LN||"
                                f"{r['quantitativeValue']}|{r['unitOfMeasure']}|{r['lowerBound']}-{r['upperBound']}|{flag}|||F")
            else:
                segments.append(f"OBX|{k}|ST|{r['testCode']}^{r['biomarkerName']}^^{r['coding'][0]['code']}^^LN||"
                                f"{r['qualitativeValue']}||||||F")
        segments.append(f"OBX|{len(segments) - 4}|ST|CLIENTORDERID^Client Order ID||{order.client_order_id}||||||F")
        return ("\r".join(segments) + "\r").encode()

    # ---- outreach: results letters -----------------------------------------------------------
    def _letter(self, order: Order, item: Item, audience: str) -> list[bytes]:
        """Send (once) the results letter to `audience` (patient | pcp) for an item with results:
        a notification, an entry in the letters feed and an `outreach` webhook (no callbackURL)."""
        letter_id = f"{audience}_{item.barcode}"
        if letter_id in self.letters or item.barcode is None:
            return []
        now = self._now()
        pdf = (b"%PDF-1.4\n% LetsGetChecked sandbox results letter\n1 0 obj <<>> endobj\n"
               + f"% {LETTER_TYPES[audience]} {item.barcode}\n".encode() + b"%%EOF\n")
        letter = Letter(letter_id, item.barcode, LETTER_TYPES[audience], "DeliverySent", now,
                        len(self.letter_feed) + 1, order.program, pdf)
        self.letters[letter_id] = letter
        self.letter_feed.append(letter_id)
        doc = {"type": "outreach", "body": self.notification_json(letter)}
        return [json.dumps(doc, separators=(",", ":")).encode()]

    def send_letter(self, client_order_id: str, audience: str, item_id: str | None = None) -> dict | None:
        """Send the patient's or the PCP's results letter of an item at ResultsAvailable (on command)."""
        if audience not in LETTER_TYPES:
            raise ValueError("audience must be patient or pcp")
        with self._lock:
            order = self.orders[client_order_id]
            item = next(i for i in order.items if item_id is None or i.id == item_id)
            if item.status != RESULTS:
                raise ValueError(f"item {item.id} is {item.status}: letters go out at ResultsAvailable")
            events = self._letter(order, item, audience)
            self._queue(events)
            letter = self.letters[f"{audience}_{item.barcode}"]
        self._kick()
        return self.notification_json(letter)

    @staticmethod
    def notification_json(letter: Letter) -> dict:
        return {"barcode": letter.barcode, "type": letter.type, "status": letter.status,
                "failureReason": None, "timestamp": _iso(letter.timestamp)}

    def notification(self, barcode: str, letter_type: str | None) -> dict | None:
        with self._lock:
            found = [self.letters[i] for i in self.letter_feed
                     if self.letters[i].barcode == barcode and (letter_type is None or self.letters[i].type == letter_type)]
            return self.notification_json(found[-1]) if found else None

    def program_notifications(self, program: str, since: datetime | None, until: datetime | None) -> list[dict]:
        with self._lock:
            return [self.notification_json(x) for x in (self.letters[i] for i in self.letter_feed)
                    if x.program == program and (since is None or x.timestamp >= since)
                    and (until is None or x.timestamp < until)]

    def feed(self, start: int, limit: int) -> list[dict]:
        """The letters feed from event `start` (1 = the first), at most `limit` events."""
        with self._lock:
            ids = self.letter_feed[max(start, 1) - 1:max(start, 1) - 1 + limit]
            return [{"eventId": self.letters[i].event_id, "letterId": i, **self.notification_json(self.letters[i])}
                    for i in ids]

    def letter_pdf(self, letter_id: str) -> bytes | None:
        with self._lock:
            letter = self.letters.get(letter_id)
            return None if letter is None else letter.pdf

    # ---- webhooks ------------------------------------------------------------------------
    def _queue(self, events: list[bytes]) -> None:
        if not self.config.webhook_url or not events:
            return
        if self.config.reorder:
            events = list(reversed(events))
        for body in events:
            if self.config.drop > 0:
                self.config.drop -= 1
                self.lost += 1
                continue
            self._outbox.append(body)
            if self.config.duplicates:
                self._outbox.append(body)

    def sign(self, body: bytes) -> str:
        key = (self.config.webhook_key or "").encode("ascii")
        return "LGC2-HMAC-SHA256 " + base64.b64encode(hmac.new(key, body, hashlib.sha256).digest()).decode()

    def _deliver(self, client: httpx.Client, body: bytes) -> None:
        with self._lock:
            url, key, retries, wait = (self.config.webhook_url, self.config.webhook_key,
                                       self.config.retries, self.config.retry_wait)
        if url is None:  # webhooks switched off since this event was queued: it goes nowhere
            with self._lock:
                self.lost += 1
            return
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = self.sign(body)
        kind = json.loads(body).get("type")
        for attempt in range(1, retries + 2):
            try:
                status = client.post(url, content=body, headers=headers).status_code
            except httpx.HTTPError:
                status = None
            with self._lock:
                self.sent.append({"type": kind, "status": status, "attempt": attempt})
            if status is not None and 200 <= status < 300:
                with self._lock:
                    self.delivered += 1
                return
            if status is not None and status not in (401, 403) and status < 500:
                break  # LetsGetChecked retries only 5xx, 401 and 403
            time.sleep(wait)
        with self._lock:
            self.lost += 1

    def _busy(self) -> bool:
        return bool(self._outbox) or self.config.auto_step_seconds > 0 or bool(self._timed)

    def _kick(self) -> None:
        with self._lock:
            if (self._thread is None or not self._thread.is_alive()) and self._busy():
                self._thread = threading.Thread(target=self._work, daemon=True, name="lgc-sandbox-lifecycle")
                self._thread.start()

    def _work(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            while True:
                self._due()
                with self._lock:
                    body = self._outbox.popleft() if self._outbox else None
                    if body is None and not self._busy():
                        self._sending = False
                        self._idle.notify_all()
                        self._thread = None
                        return
                    self._sending = body is not None
                if body is not None:
                    self._deliver(client, body)
                    with self._lock:
                        self._sending = False
                        self._idle.notify_all()
                else:
                    time.sleep(0.02)

    def stop(self) -> None:
        """Stop moving and sending (the server is going away): the worker thread ends."""
        with self._lock:
            self.config.auto_step_seconds = 0.0
            self._outbox.clear()
            for order in self.orders.values():
                for item in order.items:
                    item.cancel_due = None
            self._timed.clear()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=10)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until every queued webhook was sent (tests, the demo). False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._outbox or self._sending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True
