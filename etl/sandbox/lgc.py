"""A local LetsGetChecked Orders API, close enough to the real one to test labsync against.

    POST /oauth2/token?grant_type=client_credentials   HTTP Basic access/secret key, form body
    PUT  /{clientId}/api/v2/orders/{clientOrderId}     Bearer token, application/json

What it does like the real API (per the PUT Order document):
- 202 with the clientOrderId, participantId and one generated id per order item;
- idempotent per clientOrderId: the same body again returns the first result; a different body
  after acceptance is 409 Conflict;
- 400 Problem Details (`application/problem+json`, title/detail/errors) for a body that breaks
  the documented rules. The rules are written here independently of labsync's CSV contract
  (a sandbox that shared the client's code could not catch the client's mistakes); like many
  real APIs the detail echoes the offending value, which keeps labsync's masking honest;
- 401 for a missing, unknown or expired token (`token_ttl` sets the life of new tokens,
  `expire_tokens()` ends all current ones, `reject_tokens` refuses every token), 404 for an
  unknown clientId, 406 for an Accept it cannot serve, 415 for a body that is not JSON.
- `forced[clientOrderId] = status` answers that status (e.g. 410) for one order; a forced 400
  is a business-rule rejection whose detail echoes the patient's name, dob, email and phone.
- `token_answer = fn(request) -> Response` answers the token endpoint instead (a hostile one).
- `answers[clientOrderId] = fn(request, body_bytes) -> Response` answers one order with whatever
  `fn` builds, after the token check: a hostile vendor in a test (an HTML 200, a 202 that is not
  JSON, an endless body, an error that echoes the bearer token).

Faults (latency, 500/503, 429, dropped connections, hanging) come from `etl.sandbox.faults`
around this app. `traffic` records what arrived, outside the faults: order PUTs in flight now,
the most ever in flight at once, and when each started (how tests and bench/budget.py check the
deployment-wide rate and concurrency limits from the vendor's side).

After the PUT (`etl.sandbox.lgc_lifecycle`, state in `lifecycle`):

    GET   /{clientId}/api/v2/orders/{clientOrderId}                         the order and its items
    PATCH /{clientId}/api/v2/orders/{clientOrderId}/orderItem/{orderItemId} cancel (202, async)
    GET   /{clientId}/api/v1/results/{barcode}?alphaCode=…[&fields=status]  results JSON (404 before)
    GET   /{clientId}/api/v1/labresults/{barcode}?alphaCode=…               HL7 2.3 (Accept: application/hl7)

`get_count`, `patch_count` and `results_count` count those requests per clientOrderId / barcode.

State is in memory and guarded by a lock: the server runs in its own thread while tests
read `orders`, `put_count` and `accepted_count`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import date
from typing import Any
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from etl.sandbox.faults import Faults
from etl.sandbox.lgc_lifecycle import LgcLifecycle
from etl.settings import SANDBOX_LGC_ACCESS_KEY, SANDBOX_LGC_CLIENT_ID, SANDBOX_LGC_SECRET_KEY

# The document's allowed values. Gender, ethnicity and language lists are missing from the
# published document; these match labsync's reading of its sample (Male, Hispanic, SPANISH).
STATES = set(
    "AK AL AZ AR CA CO CT DE DC FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV NH "
    "NJ NM NY NC ND OH OK OR PA PR RI SC SD TN TX UT VT VA WA WV WI WY".split()
)
RACES = {
    "UnknownRace", "AmericanIndian", "NativeAlaskan", "Asian", "AfricanAmerican", "African",
    "Hispanic", "Latino", "PacificIslander", "NativeHawaiian", "Caucasian",
    "AshkenaziOrSephardiJewish", "OtherRace",
}
HIERARCHIES = {"Unknown", "Primary", "Secondary", "Tertiary"}
GENDERS = {"male", "female", "other", "unknown"}
ETHNICITIES = {"Hispanic", "NonHispanic", "UnknownEthnicity"}
LANGUAGES = {
    "english", "spanish", "chinese", "vietnamese", "tagalog", "arabic", "french", "korean",
    "russian", "german", "haitian_creole", "portuguese", "polish", "italian", "japanese", "other",
}
_PHONE_CC = re.compile(r"^\+\d{1,4}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_BARCODE = re.compile(r"^LGC-\d{4}-\d{4}-\d{4}$")
ORDERS_MARK = "/api/v2/orders/"
ITEM_MARK = "/orderItem/"


def npi_is_valid(npi: int) -> bool:
    """10 digits whose Luhn check (with the 80840 prefix) holds: the CMS rule."""
    digits = str(npi)
    if len(digits) != 10:
        return False
    total = 24  # the constant for the 80840 prefix
    for i, ch in enumerate(reversed(digits[:-1])):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            d = d - 9 if d > 9 else d
        total += d
    return (10 - total % 10) % 10 == int(digits[-1])


class _Checker:
    """Collects `path: message` errors while walking a body."""

    def __init__(self) -> None:
        self.errors: dict[str, list[str]] = {}

    def fail(self, path: str, message: str) -> None:
        self.errors.setdefault(path, []).append(message)

    def obj(self, parent: dict, key: str, path: str, *, required: bool) -> dict | None:
        if key not in parent:
            if required:
                self.fail(path, "is required")
            return None
        value = parent[key]
        if not isinstance(value, dict):
            self.fail(path, "must be an object" if value is not None else "must not be null")
            return None
        return value

    def text(self, parent: dict, key: str, path: str, *, required: bool = False,
             max_len: int | None = None, allowed: set[str] | None = None,
             casefold: bool = False, pattern: re.Pattern | None = None) -> str | None:
        if key not in parent:
            if required:
                self.fail(path, "is required")
            return None
        value = parent[key]
        if value is None:
            self.fail(path, "must not be null")
            return None
        if not isinstance(value, str):
            self.fail(path, "must be a string")
            return None
        if not value.strip():
            self.fail(path, "must not be empty")
            return None
        if max_len is not None and len(value) > max_len:
            self.fail(path, f"'{value}' is longer than {max_len} characters")
        if allowed is not None and (value.lower() if casefold else value) not in allowed:
            self.fail(path, f"'{value}' is not an allowed value")
        if pattern is not None and not pattern.match(value):
            self.fail(path, f"'{value}' has the wrong format")
        return value


def _address(c: _Checker, parent: dict, key: str, path: str, *, required: bool) -> None:
    a = c.obj(parent, key, path, required=required)
    if a is None:
        return
    c.text(a, "addressLine1", f"{path}.addressLine1", required=True, max_len=35)
    c.text(a, "addressLine2", f"{path}.addressLine2", max_len=35)
    c.text(a, "city", f"{path}.city", required=True)
    c.text(a, "countryIsoAlpha2", f"{path}.countryIsoAlpha2", allowed={"US"})
    c.text(a, "postalCode", f"{path}.postalCode", required=True)
    c.text(a, "state", f"{path}.state", allowed=STATES)


def validate_order(body: Any) -> dict[str, list[str]]:
    """The documented rules for a PUT Order body. Returns {field path: [messages]}."""
    c = _Checker()
    if not isinstance(body, dict):
        c.fail("$", "the body must be a JSON object")
        return c.errors
    p = c.obj(body, "patientInfo", "patientInfo", required=True)
    if p is not None:
        c.text(p, "participantId", "patientInfo.participantId", required=True)
        c.text(p, "firstName", "patientInfo.firstName", required=True)
        c.text(p, "middleName", "patientInfo.middleName")
        c.text(p, "lastName", "patientInfo.lastName", required=True)
        c.text(p, "email", "patientInfo.email", pattern=_EMAIL)
        ph = c.obj(p, "phoneNumber", "patientInfo.phoneNumber", required=True)
        if ph is not None:
            c.text(ph, "phoneCountryCode", "patientInfo.phoneNumber.phoneCountryCode",
                   required=True, pattern=_PHONE_CC)
            c.text(ph, "phoneNumber", "patientInfo.phoneNumber.phoneNumber", required=True)
        c.text(p, "gender", "patientInfo.gender", required=True, allowed=GENDERS, casefold=True)
        dob = c.text(p, "dob", "patientInfo.dob", required=True)
        if dob is not None:
            try:
                if not _DATE.match(dob):
                    raise ValueError
                when = date.fromisoformat(dob)
                if when > date.today():
                    c.fail("patientInfo.dob", f"'{dob}' is in the future")
            except ValueError:
                c.fail("patientInfo.dob", f"'{dob}' is not a valid date (YYYY-MM-DD)")
        c.text(p, "ethnicity", "patientInfo.ethnicity", required=True, allowed=ETHNICITIES)
        c.text(p, "race", "patientInfo.race", required=True, allowed=RACES)
        c.text(p, "participantLanguage", "patientInfo.participantLanguage", allowed=LANGUAGES,
               casefold=True)
        c.text(p, "healthPlanName", "patientInfo.healthPlanName")
    _address(c, body, "address", "address", required=True)
    c.text(body, "programCode", "programCode", required=True)
    items = body.get("orderItems")
    if not isinstance(items, list) or not items:
        c.fail("orderItems", "at least one order item is required")
    else:
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                c.fail(f"orderItems[{i}]", "must be an object")
                continue
            c.text(item, "code", f"orderItems[{i}].code", required=True)
            qty = item.get("quantity")
            if not isinstance(qty, int) or isinstance(qty, bool) or qty < 1:
                c.fail(f"orderItems[{i}].quantity", "must be a whole number of 1 or more")
    phys = c.obj(body, "physicianInfo", "physicianInfo", required=False)
    if phys is not None:
        c.text(phys, "firstName", "physicianInfo.firstName", required=True)
        c.text(phys, "middleName", "physicianInfo.middleName")
        c.text(phys, "lastName", "physicianInfo.lastName", required=True)
        npi = phys.get("npi")
        if not isinstance(npi, int) or isinstance(npi, bool):
            c.fail("physicianInfo.npi", "is required and must be an integer")
        elif not npi_is_valid(npi):
            c.fail("physicianInfo.npi", f"{npi} is not a valid NPI")
    pcp = c.obj(body, "primaryCareProvider", "primaryCareProvider", required=False)
    if pcp is not None:
        c.text(pcp, "id", "primaryCareProvider.id", required=True)
        names = [c.text(pcp, k, f"primaryCareProvider.{k}", required=k != "middleName")
                 for k in ("firstName", "middleName", "lastName")]
        if sum(len(n) for n in names if n) >= 100:
            c.fail("primaryCareProvider", "first, middle and last name must be under 100 characters")
        _address(c, pcp, "address", "primaryCareProvider.address", required=True)
        for k in ("phone", "phone2", "fax", "vendorName"):
            c.text(pcp, k, f"primaryCareProvider.{k}")
    ins = c.obj(body, "insurance", "insurance", required=False)
    if ins is not None:
        plan = c.obj(ins, "insurancePlan", "insurance.insurancePlan", required=False)
        if plan is not None:
            path = "insurance.insurancePlan"
            c.text(plan, "policyNumber", f"{path}.policyNumber", required=True, max_len=30)
            c.text(plan, "planName", f"{path}.planName", required=True)
            c.text(plan, "hierarchy", f"{path}.hierarchy", allowed=HIERARCHIES)
            c.text(plan, "groupName", f"{path}.groupName")
            c.text(plan, "groupNumber", f"{path}.groupNumber")
    c.text(body, "note", "note")
    if "diagnosisCodes" in body:
        codes = body["diagnosisCodes"]
        if not isinstance(codes, list) or not all(isinstance(x, str) and x for x in codes):
            c.fail("diagnosisCodes", "must be a list of codes")
    if "customData" in body:
        data = body["customData"]
        if not isinstance(data, list) or not all(
            isinstance(d, dict) and isinstance(d.get("key"), str) and d["key"]
            and isinstance(d.get("value"), str)
            for d in data
        ):
            c.fail("customData", "must be a list of {key, value} strings")
    return c.errors


def problem(status: int, title: str, detail: str | None = None, *,
            headers: dict[str, str] | None = None, **extra) -> JSONResponse:
    body = {"type": f"https://httpstatuses.io/{status}", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type="application/problem+json",
                        headers=headers)


def max_in_window(starts: list[float], window: float = 1.0) -> int:
    """The most start times falling in any `window` seconds (a sliding window)."""
    times = sorted(starts)
    best, first = 0, 0
    for last, t in enumerate(times):
        while t - times[first] >= window:
            first += 1
        best = max(best, last - first + 1)
    return best


class Traffic:
    """Order PUTs as the vendor sees them: counted around the whole app, faults included."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.in_flight = 0
            self.max_in_flight = 0
            self.starts: list[float] = []  # time.monotonic() when each PUT arrived
            self.order_ids: list[str] = []  # and its clientOrderId

    def counting(self, app):
        """ASGI middleware around `app` that counts PUTs to the orders path."""

        async def counted(scope, receive, send):
            if scope["type"] != "http" or scope.get("method") != "PUT" or ORDERS_MARK not in scope.get("path", ""):
                return await app(scope, receive, send)
            raw = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
            with self._lock:
                self.starts.append(time.monotonic())
                self.order_ids.append(unquote(raw.split(ORDERS_MARK, 1)[-1].split("?")[0]))
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                return await app(scope, receive, send)
            finally:
                with self._lock:
                    self.in_flight -= 1

        return counted

    def snapshot(self) -> dict:
        with self._lock:
            starts = list(self.starts)
            return {"in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                    "puts": len(starts), "max_per_second": max_in_window(starts), "starts": starts}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class LgcSandbox:
    """The LetsGetChecked sandbox's state and its ASGI app."""

    def __init__(self, *, client_ids: set[str] | None = None, token_ttl: float = 3600.0) -> None:
        self.faults = Faults()
        self.client_ids: set[str] = set(client_ids or {SANDBOX_LGC_CLIENT_ID})
        self.credentials: dict[str, str] = {SANDBOX_LGC_ACCESS_KEY: SANDBOX_LGC_SECRET_KEY}
        self.token_ttl = token_ttl
        self.static_tokens: set[str] = set()  # accepted forever, like a ready LGC_API_TOKEN
        self.reject_tokens = False  # True: every PUT answers 401, even with a fresh token
        self.forced: dict[str, int] = {}  # clientOrderId -> status to answer
        self.answers: dict[str, Callable[[Request, bytes], Response]] = {}  # scripted answers
        self.token_answer: Callable[[Request], Response] | None = None
        self.tokens: dict[str, float] = {}  # token -> expiry (time.monotonic)
        self.token_requests = 0
        self.issued: list[str] = []
        self.orders: dict[str, dict] = {}  # clientOrderId -> {"body", "response", "client_id"}
        self.put_count: Counter = Counter()  # every PUT that reached the handler
        self.accepted_count: Counter = Counter()  # orders created (must never exceed 1)
        self.status_count: Counter = Counter()
        self.traffic = Traffic()
        self.lifecycle = LgcLifecycle()  # items, results, cancels and webhooks after the PUT
        self.get_count: Counter = Counter()  # GET order per clientOrderId
        self.patch_count: Counter = Counter()  # PATCH cancel per clientOrderId
        self.results_count: Counter = Counter()  # results requests per barcode
        self._secret = secrets.token_bytes(32)
        self._lock = threading.Lock()

    # ---- knobs for tests ----------------------------------------------------------------
    def expire_tokens(self) -> None:
        with self._lock:
            self.tokens = {t: 0.0 for t in self.tokens}

    def reset(self) -> None:
        with self._lock:
            self.orders.clear()
            self.put_count.clear()
            self.accepted_count.clear()
            self.status_count.clear()
            self.tokens.clear()
            self.forced.clear()
            self.answers.clear()
            self.token_requests = 0
            self.reject_tokens = False
            self.get_count.clear()
            self.patch_count.clear()
            self.results_count.clear()
        self.faults.reset()
        self.traffic.reset()
        self.lifecycle.reset()

    # ---- tokens -------------------------------------------------------------------------
    def _new_token(self) -> str:
        now = time.time()
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        claims = _b64(json.dumps({"iss": "lgc-sandbox", "iat": int(now),
                                  "exp": int(now + self.token_ttl), "jti": uuid.uuid4().hex}).encode())
        sig = _b64(hmac.new(self._secret, f"{header}.{claims}".encode(), hashlib.sha256).digest())
        return f"{header}.{claims}.{sig}"

    async def token_endpoint(self, request: Request) -> Response:
        with self._lock:
            self.token_requests += 1
        if self.token_answer is not None:
            return self.token_answer(request)
        if request.query_params.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            return JSONResponse({"error": "invalid_request",
                                 "error_description": "use application/x-www-form-urlencoded"},
                                status_code=400)
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user = password = ""
        if scheme.lower() != "basic" or self.credentials.get(user) != password or not user:
            return JSONResponse({"error": "invalid_client"}, status_code=401,
                                headers={"WWW-Authenticate": 'Basic realm="lgc"'})
        token = self._new_token()
        with self._lock:
            self.tokens[token] = time.monotonic() + self.token_ttl
            self.issued.append(token)
        ttl = self.token_ttl
        return JSONResponse({"access_token": token, "token_type": "Bearer",
                             "expires_in": int(ttl) if float(ttl).is_integer() else ttl})

    def _token_ok(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token or self.reject_tokens:
            return False
        if token in self.static_tokens:
            return True
        with self._lock:
            expiry = self.tokens.get(token)
        return expiry is not None and time.monotonic() < expiry

    # ---- orders -------------------------------------------------------------------------
    async def put_order(self, request: Request) -> Response:
        client_id = request.path_params["client_id"]
        raw = request.scope.get("raw_path") or request.url.path.encode()
        raw_path = raw.decode("latin-1").split("?")[0]
        client_order_id = unquote(raw_path.split(ORDERS_MARK, 1)[1]) if ORDERS_MARK in raw_path else ""
        body_bytes = await request.body()
        response = self._put(request, client_id, client_order_id, body_bytes)
        # the order goes on once stored, whatever went back (a scripted answer may hide it)
        if client_order_id in self.orders and client_order_id not in self.lifecycle.orders:
            base = str(request.url).split(ORDERS_MARK, 1)[0]
            order = self.orders[client_order_id]
            self.lifecycle.order_accepted(client_order_id, client_id, base, order["body"],
                                          order["response"]["orderItems"])
        with self._lock:
            self.put_count[client_order_id] += 1
            self.status_count[response.status_code] += 1
        return response

    def _put(self, request: Request, client_id: str, coid: str, raw: bytes) -> Response:
        if not self._token_ok(request):
            return problem(401, "Unauthorized", "missing, invalid or expired bearer token",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        scripted = self.answers.get(coid)
        if scripted is not None:
            return scripted(request, raw)
        if client_id not in self.client_ids:
            return problem(404, "Not Found", "unknown clientId")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return problem(415, "Unsupported Media Type", "the payload must be application/json")
        accept = request.headers.get("accept", "*/*").lower()
        if not any(a.split(";")[0].strip() in ("application/json", "application/*", "*/*")
                   for a in accept.split(",")):
            return problem(406, "Not Acceptable", "this API answers application/json only")
        if not coid or len(coid) > 100:
            return problem(400, "Bad Request", "clientOrderId must be 1 to 100 characters")
        try:
            body = json.loads(raw)
        except ValueError:
            return problem(400, "Bad Request", "the body is not valid JSON")
        forced = self.forced.get(coid)
        if forced == 400:  # a business-rule rejection whose detail echoes PHI, as vendors do
            p = body.get("patientInfo", {}) if isinstance(body, dict) else {}
            phone = p.get("phoneNumber", {}) if isinstance(p, dict) else {}
            return problem(400, "Participant not eligible",
                           f"participant {p.get('firstName')} {p.get('lastName')} born "
                           f"{p.get('dob')} ({p.get('email')}, {phone.get('phoneNumber')}) is "
                           "already enrolled in another program")
        if forced:
            return problem(forced, "Forced", f"the sandbox was told to answer {forced}")
        errors = validate_order(body)
        if errors:
            detail = "; ".join(f"{k}: {m}" for k, ms in errors.items() for m in ms)
            return problem(400, "One or more validation errors occurred.", detail, errors=errors)
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        with self._lock:
            existing = self.orders.get(coid)
            if existing is not None:
                if existing["canonical"] == canonical and existing["client_id"] == client_id:
                    return JSONResponse(existing["response"], status_code=202)
                return problem(409, "Conflict", "Order cannot be modified after successful submission")
            result = {
                "clientOrderId": coid,
                "participantId": body["patientInfo"]["participantId"],
                "orderItems": [{"code": i["code"], "id": str(uuid.uuid4())} for i in body["orderItems"]],
            }
            self.orders[coid] = {"client_id": client_id, "body": body, "canonical": canonical,
                                 "response": result}
            self.accepted_count[coid] += 1
        return JSONResponse(result, status_code=202)

    # ---- after the PUT ----------------------------------------------------------------------
    def _refuse(self, request: Request, client_id: str) -> Response | None:
        """401 / 404 / 406 like the PUT, or None when the request may go on."""
        if not self._token_ok(request):
            return problem(401, "Unauthorized", "missing, invalid or expired bearer token",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        if client_id not in self.client_ids:
            return problem(404, "Not Found", "unknown clientId")
        return None

    @staticmethod
    def _accepts(request: Request, *types: str) -> bool:
        accept = request.headers.get("accept", "*/*").lower()
        return any(a.split(";")[0].strip() in (*types, "*/*") for a in accept.split(","))

    @staticmethod
    def _order_path(request: Request) -> str:
        raw = request.scope.get("raw_path") or request.url.path.encode()
        raw_path = raw.decode("latin-1").split("?")[0]
        return raw_path.split(ORDERS_MARK, 1)[1] if ORDERS_MARK in raw_path else ""

    async def get_order(self, request: Request) -> Response:
        client_id = request.path_params["client_id"]
        coid = unquote(self._order_path(request))
        with self._lock:
            self.get_count[coid] += 1
        refused = self._refuse(request, client_id)
        if refused is not None:
            return refused
        if not self._accepts(request, "application/json", "application/*"):
            return problem(406, "Not Acceptable", "this API answers application/json only")
        order = self.lifecycle.order_json(coid)
        if order is None or self.lifecycle.orders[coid].client_id != client_id:
            return problem(404, "Not Found", "no order with this clientOrderId")
        return JSONResponse(order)

    async def patch_item(self, request: Request) -> Response:
        client_id = request.path_params["client_id"]
        path = self._order_path(request)
        if ITEM_MARK not in path:
            return problem(405, "Method Not Allowed", "PATCH an order item: .../orderItem/{orderItemId}")
        coid, item_id = (unquote(p) for p in path.split(ITEM_MARK, 1))
        with self._lock:
            self.patch_count[coid] += 1
        refused = self._refuse(request, client_id)
        if refused is not None:
            return refused
        try:
            body = json.loads(await request.body())
        except ValueError:
            return problem(400, "Bad Request", "the body is not valid JSON")
        if not _is_cancel(body):
            return problem(400, "Bad Request", "expected a patchOperation replacing the status with Cancelled")
        status, reason = self.lifecycle.cancel(coid, item_id)
        if status != 202:
            return problem(status, "Conflict" if status == 409 else "Not Found", reason)
        return Response(status_code=202)

    async def get_results(self, request: Request) -> Response:
        lab = request.url.path.rstrip("/").split("/")[-2] == "labresults"
        barcode, alpha = request.path_params["barcode"], request.query_params.get("alphaCode")
        with self._lock:
            self.results_count[barcode] += 1
        refused = self._refuse(request, request.path_params["client_id"])
        if refused is not None:
            return refused
        if not _BARCODE.match(barcode) or (alpha is not None and not re.fullmatch(r"[A-Z]{6}", alpha)):
            return problem(400, "Bad Request", "barcode must look like LGC-0000-0000-0000, alphaCode like AAAAAA")
        if request.query_params.get("fields") == "status" and not lab:
            status = self.lifecycle.result_status(barcode, alpha)
            if status is None:
                return problem(404, "Not Found", "no kit with this barcode")
            return JSONResponse({"status": status})
        found = self.lifecycle.results(barcode, alpha)
        if found is None or found[1].status != "ResultsAvailable":
            return problem(404, "Not Found", "no results released for this barcode")
        order, item = found
        if lab and self._accepts(request, "application/hl7"):
            return Response(self.lifecycle.results_hl7(order, item), media_type="application/hl7")
        if not self._accepts(request, "application/json", "application/*"):
            return problem(406, "Not Acceptable", "ask for application/json or application/hl7")
        return Response(self.lifecycle.results_json(item), media_type="application/json")

    # ---- the Outreach API (results letters). LetsGetChecked publishes no paths for it; these
    # are modelled on the Results API (v1, by barcode), like labsync's client (etl.lgc.outreach).
    OUTREACH_PAGE = 50

    async def get_notification(self, request: Request) -> Response:
        """GET .../api/v1/outreach/notifications/{barcode}?type=PatientResultsLetter: one notification."""
        refused = self._refuse(request, request.path_params["client_id"])
        if refused is not None:
            return refused
        barcode = request.path_params["barcode"]
        if not _BARCODE.match(barcode):
            return problem(400, "Bad Request", "barcode must look like LGC-0000-0000-0000")
        found = self.lifecycle.notification(barcode, request.query_params.get("type"))
        if found is None:
            return problem(404, "Not Found", "no notification for this barcode")
        return JSONResponse(found)

    async def list_notifications(self, request: Request) -> Response:
        """GET .../api/v1/outreach/programs/{program}/notifications?from=&to=, paged: the answer's
        `X-Continuation-Token` header, sent back as a request header, asks for the next page."""
        refused = self._refuse(request, request.path_params["client_id"])
        if refused is not None:
            return refused
        from etl.sandbox.lgc_lifecycle import parse_iso

        try:
            since = parse_iso(request.query_params.get("from"))
            until = parse_iso(request.query_params.get("to"))
            start = int(request.headers.get("x-continuation-token") or 0)
        except ValueError:
            return problem(400, "Bad Request", "from/to must be ISO 8601 times; a continuation token as given")
        found = self.lifecycle.program_notifications(unquote(request.path_params["program"]), since, until)
        page = found[start:start + self.OUTREACH_PAGE]
        headers = {}
        if start + self.OUTREACH_PAGE < len(found):
            headers["X-Continuation-Token"] = str(start + self.OUTREACH_PAGE)
        return JSONResponse({"notifications": page}, headers=headers)

    async def letters_feed(self, request: Request) -> Response:
        """GET .../api/v1/outreach/letters-feed?startEventId=N&limit=M: the feed from event N."""
        refused = self._refuse(request, request.path_params["client_id"])
        if refused is not None:
            return refused
        try:
            start = int(request.query_params.get("startEventId") or 1)
            limit = min(int(request.query_params.get("limit") or 100), 500)
        except ValueError:
            return problem(400, "Bad Request", "startEventId and limit are numbers")
        return JSONResponse({"events": self.lifecycle.feed(start, limit)})

    async def get_letter(self, request: Request) -> Response:
        """GET .../api/v1/outreach/letters/{letterId}: the letter's PDF."""
        refused = self._refuse(request, request.path_params["client_id"])
        if refused is not None:
            return refused
        pdf = self.lifecycle.letter_pdf(request.path_params["letter_id"])
        if pdf is None:
            return problem(404, "Not Found", "no letter with this id")
        return Response(pdf, media_type="application/pdf")

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/oauth2/token", self.token_endpoint, methods=["POST"]),
                Route("/{client_id}/api/v2/orders/{rest:path}", self.put_order, methods=["PUT"]),
                Route("/{client_id}/api/v2/orders/{rest:path}", self.get_order, methods=["GET"]),
                Route("/{client_id}/api/v2/orders/{rest:path}", self.patch_item, methods=["PATCH"]),
                Route("/{client_id}/api/v1/results/{barcode}", self.get_results, methods=["GET"]),
                Route("/{client_id}/api/v1/labresults/{barcode}", self.get_results, methods=["GET"]),
                Route("/{client_id}/api/v1/outreach/notifications/{barcode}", self.get_notification, methods=["GET"]),
                Route("/{client_id}/api/v1/outreach/programs/{program}/notifications", self.list_notifications,
                      methods=["GET"]),
                Route("/{client_id}/api/v1/outreach/letters-feed", self.letters_feed, methods=["GET"]),
                Route("/{client_id}/api/v1/outreach/letters/{letter_id}", self.get_letter, methods=["GET"]),
            ]
        )


def _is_cancel(body: Any) -> bool:
    """`{"patchOperation": {"op": "replace", "path": "/status", "value": "Cancelled"}}` (the
    issue's reading of LetsGetChecked's description), or a JSON Patch list with that operation."""
    ops = body.get("patchOperation") if isinstance(body, dict) else body
    ops = ops if isinstance(ops, list) else [ops]
    return any(isinstance(o, dict) and str(o.get("op", "")).lower() == "replace"
               and str(o.get("value", "")).lower() == "cancelled" for o in ops)
