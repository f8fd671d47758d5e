"""The Rupa sandbox's checkout side: a checkout form, orders that move through statuses, result
files behind expiring links, and events sent to a configured URL.

    GET  /checkout/{order_intent id}   a form a person can submit in a browser (no auth, like
                                       the practitioner's Rupa session)
    POST /checkout/{order_intent id}   creates the Order (status "Pending Payment"), sends
                                       `order.updated`, redirects (303) to return_url?order=ord_…
    GET  /results/{token}              a result file (PDF or HL7); 403 once the link has expired

Events are Rupa's envelope: `{"type", "created_at", "data": {"object": <order>, "included":
[<ordered tests>, <patient>]}}`, delivered by a background thread to `events.url` (POST, JSON),
retried on non-2xx like Rupa does (here a few times, quickly). Switches on `EventSender`:
`duplicates` (extra copies of every event), `reorder` (each batch of queued events delivered
newest first), `hold` (queue until `release()`), `secret` (sign with HMAC-SHA256, hex, in
`header`, labsync's default verifier settings).

Test and demo helpers: `submit(intent_id)`, `advance(order_id, status)`,
`add_results(order_id)`, `expire_result_links()`, `events.flush()`.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import itertools
import json
import secrets
import threading
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import httpx
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

STATUSES = ("Pending Payment", "In Progress", "Results Received", "Complete", "Canceled")
DELIVERY_ATTEMPTS = 5


class EventSender:
    """Deliver events to `url` from a background thread, with Rupa-like retries."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url
        self.duplicates = 0
        self.reorder = False
        self.hold = False
        self.secret: str | None = None
        self.header = "X-Rupa-Signature"
        self.delivered: list[tuple[str, int]] = []  # (event type, final HTTP status or 0)
        self._queue: list[bytes] = []
        self._busy = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def configure(self, **changes) -> None:
        allowed = {"url", "duplicates", "reorder", "hold", "secret", "header"}
        with self._cond:
            for key, value in changes.items():
                if key not in allowed:
                    raise ValueError(f"unknown event switch {key!r}")
                setattr(self, key, value)
            self._cond.notify_all()

    def as_dict(self) -> dict:
        with self._cond:
            return {"url": self.url, "duplicates": self.duplicates, "reorder": self.reorder,
                    "hold": self.hold, "signed": bool(self.secret), "queued": len(self._queue),
                    "delivered": len(self.delivered)}

    def emit(self, body: bytes) -> None:
        with self._cond:
            if not self.url:
                return
            self._queue.append(body)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="rupa-sandbox-events")
                self._thread.start()
            self._cond.notify_all()

    def release(self) -> None:
        self.configure(hold=False)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued event has been delivered (or given up on)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        with httpx.Client(timeout=5.0) as http:
            while True:
                with self._cond:
                    while not self._queue or self.hold or not self.url:
                        self._cond.wait()
                    batch, self._queue = self._queue, []
                    self._busy += 1
                    url, copies = self.url, 1 + max(0, int(self.duplicates))
                    order = list(reversed(batch)) if self.reorder else batch
                    secret, header = self.secret, self.header
                try:
                    for body in order:
                        for _ in range(copies):
                            self._deliver(http, url, body, secret, header)
                finally:
                    with self._cond:
                        self._busy -= 1
                        self._cond.notify_all()

    def _deliver(self, http: httpx.Client, url: str, body: bytes, secret: str | None, header: str) -> None:
        headers = {"Content-Type": "application/json"}
        if secret:
            headers[header] = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        kind = json.loads(body).get("type", "")
        status = 0
        for attempt in range(DELIVERY_ATTEMPTS):
            try:
                status = http.post(url, content=body, headers=headers).status_code
            except httpx.HTTPError:
                status = 0
            if 200 <= status < 300:
                break
            time.sleep(min(0.05 * 2 ** attempt, 1.0))
        with self._cond:
            self.delivered.append((kind, status))


def _iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _pdf(text: str) -> bytes:
    """A small, valid one-page PDF showing `text` (hand-built: the sandbox needs no PDF library)."""
    safe = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    stream = f"BT /F1 14 Tf 72 720 Td ({safe}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, obj in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n".encode() + obj + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def _hl7(ordered_test_id: str, patient_id: str, lab_test_id: str, version: int, when: datetime) -> bytes:
    stamp = when.strftime("%Y%m%d%H%M%S")
    segments = [
        f"MSH|^~\\&|RUPA|SANDBOX|LABSYNC|LABSYNC|{stamp}||ORU^R01|{ordered_test_id}-{version}|P|2.5.1",
        f"PID|1||{patient_id}",
        f"OBR|1|{ordered_test_id}||{lab_test_id}",
        f"OBX|1|NM|25OHD^Vitamin D^L||{30 + version}|ng/mL|30-100|N|||{'C' if version > 1 else 'F'}",
    ]
    return ("\r".join(segments) + "\r").encode()


class RupaCheckout:
    """Orders made from the sandbox's order intents. Shares the sandbox's lock."""

    def __init__(self, sandbox, *, result_link_ttl: float = 600.0, events_url: str | None = None) -> None:
        self.sandbox = sandbox
        self.result_link_ttl = result_link_ttl
        self.orders: dict[str, dict] = {}
        self.ordered_tests: dict[str, dict] = {}
        self.by_intent: dict[str, str] = {}
        self.results: dict[str, tuple[bytes, str, float]] = {}  # token -> (bytes, type, expiry)
        self.result_versions: dict[str, int] = {}
        self.events: list[dict] = []  # every event emitted, in order (tests replay them)
        self.sender = EventSender(events_url)
        self._ids = itertools.count(1)
        self._clock = datetime.now(UTC)

    @property
    def _lock(self):
        return self.sandbox._lock

    def _tick(self) -> datetime:
        """Strictly increasing event times, so `created_at` orders events without ties."""
        now = datetime.now(UTC)
        self._clock = max(now, self._clock + timedelta(microseconds=1))
        return self._clock

    # ---- the practitioner's side ---------------------------------------------------------------
    async def page(self, request: Request) -> Response:
        oid = request.path_params["id"]
        with self._lock:
            intent = self.sandbox.order_intents.get(oid)
            done = self.by_intent.get(oid)
        if intent is None:
            return HTMLResponse("<h1>Unknown order intent</h1>", status_code=404)
        tests = [t["id"] for t in intent["relationships"]["lab_tests"]["data"]]
        names = []
        with self._lock:
            for tid in tests:
                pos = self.sandbox.lab_tests.pos_of(tid)
                names.append(self.sandbox.lab_tests.attributes(pos)["name"] if pos is not None else tid)
        rows = "".join(f"<li>{html.escape(n)} <code>{html.escape(t)}</code></li>" for n, t in zip(names, tests, strict=True))
        state = (f"<p id='already'>Already submitted as order <code>{html.escape(done)}</code>.</p>"
                 if done else "")
        return HTMLResponse(f"""<!doctype html><html><head><meta charset='utf-8'>
<title>Rupa sandbox checkout</title></head><body>
<h1>Rupa sandbox checkout</h1>{state}
<p>Order intent <code id='intent'>{html.escape(oid)}</code> for patient
<code>{html.escape(intent['relationships']['patient']['data']['id'])}</code></p>
<ul id='tests'>{rows or '<li>no lab tests yet</li>'}</ul>
<form method='post' action='{html.escape(str(request.url.path))}'>
<label>Who pays <select name='payer' id='payer'><option>Patient</option><option>Practitioner</option></select></label>
<button type='submit' id='submit-order'>Submit order</button>
</form></body></html>""")

    async def submit_form(self, request: Request) -> Response:
        oid = request.path_params["id"]
        form = await request.form()
        try:
            order_id = self.submit(oid, payer=str(form.get("payer") or "Patient"))
        except KeyError:
            return HTMLResponse("<h1>Unknown order intent</h1>", status_code=404)
        with self._lock:
            return_url = self.sandbox.order_intents[oid]["attributes"]["return_url"]
        sep = "&" if urlsplit(return_url).query else "?"
        return RedirectResponse(f"{return_url}{sep}order={order_id}", status_code=303)

    def submit(self, intent_id: str, *, payer: str = "Patient") -> str:
        """Check an order intent out (what the form does): the Order, its ordered tests, an
        `order.updated` event. A second submit returns the same order."""
        with self._lock:
            if intent_id in self.by_intent:
                return self.by_intent[intent_id]
            intent = self.sandbox.order_intents[intent_id]
            n = next(self._ids)
            order_id = f"ord_{n:06d}"
            base = intent["attributes"]["checkout_url"].rsplit("/checkout/", 1)[0]
            tests = [t["id"] for t in intent["relationships"]["lab_tests"]["data"]]
            ordered = []
            for i, lab_test in enumerate(tests, start=1):
                tid = f"ordts_{n:06d}{i:02d}"
                self.ordered_tests[tid] = {
                    "type": "ordered_test", "id": tid,
                    "attributes": {"date_results_received_from_lab": None, "results_pdf": None,
                                   "results_hl7": None, "requisition": None},
                    "relationships": {"lab_test": {"data": {"type": "lab_test", "id": lab_test}},
                                      "order": {"data": {"type": "order", "id": order_id}}},
                }
                ordered.append(tid)
            now = self._tick()
            self.orders[order_id] = {
                "type": "order", "id": order_id, "_base": base,
                "attributes": {"status": "Pending Payment", "date_submitted": _iso(now), "date_paid": None,
                               "date_completed": None, "date_canceled": None, "payer": payer,
                               "total_price": f"{99 * max(1, len(tests))}.00", "notes_to_patient": ""},
                "relationships": {
                    "patient": {"data": intent["relationships"]["patient"]["data"]},
                    "ordered_tests": {"data": [{"type": "ordered_test", "id": t} for t in ordered]},
                    "order_intent": {"data": {"type": "order_intent", "id": intent_id}},
                    "practitioner": {"data": {"type": "practitioner", "id": "prac_sandbox"}},
                },
            }
            self.by_intent[intent_id] = order_id
            self._emit("order.updated", order_id, now)
        return order_id

    # ---- the lab's side -------------------------------------------------------------------------
    def advance(self, order_id: str, status: str) -> dict:
        """Move an order to `status` and send `order.updated`."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        with self._lock:
            order = self.orders[order_id]
            now = self._tick()
            attrs = order["attributes"]
            attrs["status"] = status
            if status == "In Progress" and not attrs["date_paid"]:
                attrs["date_paid"] = _iso(now)
            if status == "Complete":
                attrs["date_completed"] = _iso(now)
            if status == "Canceled":
                attrs["date_canceled"] = _iso(now)
            return self._emit("order.updated", order_id, now)

    def add_results(self, order_id: str) -> list[dict]:
        """A result (PDF + HL7) for every ordered test of the order, behind fresh expiring links;
        one `order.new_result` per ordered test. Called again, it is a correction (new content)."""
        events = []
        with self._lock:
            order = self.orders[order_id]
            patient = order["relationships"]["patient"]["data"]["id"]
            for ref in order["relationships"]["ordered_tests"]["data"]:
                test = self.ordered_tests[ref["id"]]
                version = self.result_versions.get(ref["id"], 0) + 1
                self.result_versions[ref["id"]] = version
                now = self._tick()
                lab_test = test["relationships"]["lab_test"]["data"]["id"]
                attrs = test["attributes"]
                attrs["date_results_received_from_lab"] = _iso(now)
                attrs["results_pdf"] = self._link(order, _pdf(f"Sandbox result {ref['id']} version {version}"),
                                                  "application/pdf")
                attrs["results_hl7"] = self._link(order, _hl7(ref["id"], patient, lab_test, version, now),
                                                  "application/hl7-v2")
                order["attributes"]["status"] = "Results Received"
                events.append(self._emit("order.new_result", order_id, now))
        return events

    def renew_result_links(self, order_id: str) -> list[dict]:
        """Fresh links for the current results (Rupa repeats `order.new_result`)."""
        events = []
        with self._lock:
            order = self.orders[order_id]
            for ref in order["relationships"]["ordered_tests"]["data"]:
                attrs = self.ordered_tests[ref["id"]]["attributes"]
                for kind in ("results_pdf", "results_hl7"):
                    if attrs[kind]:
                        content, ctype, _ = self.results[attrs[kind].rsplit("/", 1)[1]]
                        attrs[kind] = self._link(order, content, ctype)
                events.append(self._emit("order.new_result", order_id, self._tick()))
        return events

    def expire_result_links(self) -> None:
        with self._lock:
            self.results = {k: (b, c, 0.0) for k, (b, c, _) in self.results.items()}

    def _link(self, order: dict, content: bytes, ctype: str) -> str:
        token = secrets.token_urlsafe(18)
        self.results[token] = (content, ctype, time.monotonic() + self.result_link_ttl)
        return f"{order['_base']}/results/{token}"

    async def result(self, request: Request) -> Response:
        with self._lock:
            entry = self.results.get(request.path_params["token"])
        if entry is None:
            return JSONResponse({"error": "not found"}, status_code=404)
        content, ctype, expires = entry
        if expires < time.monotonic():
            return JSONResponse({"error": "Request has expired"}, status_code=403)
        return Response(content, media_type=ctype)

    # ---- events ----------------------------------------------------------------------------------
    def event(self, kind: str, order_id: str, when: datetime) -> dict:
        """The event document for an order as it is now."""
        order = self.orders[order_id]
        obj = {k: json.loads(json.dumps(v)) for k, v in order.items() if not k.startswith("_")}
        included = [json.loads(json.dumps(self.ordered_tests[r["id"]]))
                    for r in order["relationships"]["ordered_tests"]["data"]]
        patient = self.sandbox.patient(order["relationships"]["patient"]["data"]["id"])
        if patient is not None:
            included.append(patient)
        return {"type": kind, "created_at": _iso(when), "data": {"object": obj, "included": included}}

    def _emit(self, kind: str, order_id: str, when: datetime) -> dict:
        doc = self.event(kind, order_id, when)
        self.events.append(doc)
        self.sender.emit(json.dumps(doc).encode())
        return doc

    # ---- control (`/_sandbox/rupa/...`) ------------------------------------------------------------
    async def control_events(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                self.sender.configure(**(await request.json()))
            except (ValueError, TypeError) as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(self.sender.as_dict())

    async def control_order(self, request: Request) -> Response:
        """POST {"status": "..."} and/or {"results": true}: move an order on (the demo uses it)."""
        order_id = request.path_params["id"]
        try:
            body = await request.json() if request.method == "POST" else {}
        except ValueError:
            return JSONResponse({"error": "send JSON"}, status_code=400)
        with self._lock:
            if order_id == "latest" and self.orders:
                order_id = list(self.orders)[-1]
            if order_id not in self.orders:
                return JSONResponse({"error": "unknown order"}, status_code=404)
        try:
            if body.get("status"):
                self.advance(order_id, body["status"])
            if body.get("results"):
                self.add_results(order_id)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        with self._lock:
            return JSONResponse({"id": order_id, "status": self.orders[order_id]["attributes"]["status"]})
