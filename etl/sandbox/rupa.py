"""A local Rupa Health API: JSON:API documents, `links.next` paging, OAuth2 and Bearer checks.

Why it exists: extraction, token refresh and resume-after-kill must be tested over real HTTP
without a Rupa account. It behaves strictly where the real API could hurt us (single-use
authorization codes, rotated refresh tokens that invalidate the old one, short-lived access
tokens, 401 as a JSON:API error document) so client bugs show up here first.

Records are synthetic and generated from their index on demand, so a 200,000-patient sandbox
costs no more memory than a 50-patient one: only edits, deletions and created patients are
stored. Paging uses an opaque cursor (`page[after]`, a position in a stable order), which stays
valid while records are edited or deleted during a run.

Routes (relative to the mount point, `/rupa` in `etl.sandbox.server`):

    GET  /patients, /patients/{id}, /lab_tests, /lab_tests/{id}     Bearer
    POST /patients              de-duplicated on first_name + last_name + email
    POST /order_intents         returns attributes.checkout_url
    GET  /checkout/{id}         the checkout form (no auth); POST submits it (etl.sandbox.rupa_checkout:
                                orders, statuses, results behind expiring links, events)
    GET  /results/{token}       a result file while its link is valid
    GET  /oauth/authorize       redirects to redirect_uri with ?code=...&state=...
    POST /oauth/token           grant_type authorization_code | refresh_token

Hostile-vendor knobs for tests: `rewrite_next(url, next_url) -> next_url` changes the `links.next`
of every list page (cycles, endless paging); `answer(request) -> Response | None` answers any
authorized request with a scripted response (None serves it normally); `token_answer(request)`
answers the token endpoint instead.

Test helpers: `update_patient`, `delete_patient`, `update_lab_test`, `delete_lab_test`,
`revoke_all`, `expire_access_tokens`, `issue_code`, `mint_access_token`, `stats`, `requests`.
"""

from __future__ import annotations

import base64
import collections
import json
import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from etl.sandbox.faults import Faults
from etl.sandbox.rupa_checkout import RupaCheckout
from etl.settings import SANDBOX_RUPA_CLIENT_ID, SANDBOX_RUPA_CLIENT_SECRET

JSONAPI = "application/vnd.api+json"
EPOCH = "2024-01-01T00:00:00Z"
MAX_PAGE_SIZE = 1000

_FIRST = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "John", "Radia",
          "Ken", "Margaret", "Dennis", "Hedy", "Claude", "Karen", "Tim", "Sophie", "Leslie")
_LAST = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Backus",
         "Perlman", "Thompson", "Hamilton", "Ritchie", "Lamarr", "Shannon", "Jones", "Lee")
_PANELS = ("Comprehensive Stool Analysis", "Thyroid Panel", "Micronutrient Test", "Lipid Panel",
           "Food Sensitivity", "Hormone Panel", "Metabolic Panel", "Vitamin D", "Iron Panel")
_LABS = ("Sandbox Labs", "Example Diagnostics", "Test Bench Laboratories")


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Records:
    """One resource collection: `count` generated records plus edits, deletions and additions.

    Position p < count is generated record p; position count + k is the k-th added record.

    A generated record that was never edited is rendered as JSON once and its text kept: paging
    through a large sandbox again then costs the sandbox's process little, the way a remote API's
    pages cost the client's machine nothing (on the 2 cores of bench/extract.py the rendering
    competed with the warehouse for CPU).
    """

    def __init__(self, kind: str, prefix: str, count: int, make: Callable[[int], dict]) -> None:
        self.kind, self.prefix, self.count, self._make = kind, prefix, count, make
        self.overrides: dict[int, dict] = {}
        self.added: list[dict] = []
        self.deleted: set[int] = set()
        self._texts: dict[int, str] = {}  # generated, unedited position -> its JSON text

    def id_of(self, pos: int) -> str:
        return f"{self.prefix}{pos:07d}" if pos < self.count else f"{self.prefix}n{pos - self.count:06d}"

    def pos_of(self, rid: str) -> int | None:
        tail = rid[len(self.prefix):] if rid.startswith(self.prefix) else ""
        if tail.startswith("n") and tail[1:].isdigit():
            pos = self.count + int(tail[1:])
        elif tail.isdigit() and len(tail) == 7:
            pos = int(tail)
        else:
            return None
        return pos if pos < self.count + len(self.added) and pos not in self.deleted else None

    def attributes(self, pos: int) -> dict:
        if pos in self.overrides:
            return self.overrides[pos]
        if pos >= self.count:
            return self.added[pos - self.count]
        return self._make(pos)

    def resource(self, pos: int) -> dict:
        attrs = dict(self.attributes(pos))
        rels = attrs.pop("_relationships", {})
        return {"type": self.kind, "id": self.id_of(pos), "attributes": attrs, "relationships": rels}

    def text(self, pos: int) -> str:
        """The resource at `pos` as JSON text (what _doc would write for it)."""
        if pos < self.count and pos not in self.overrides:
            text = self._texts.get(pos)
            if text is None:
                text = self._texts[pos] = _dumps(self.resource(pos))
            return text
        return _dumps(self.resource(pos))

    def live(self) -> int:
        return self.count + len(self.added) - len(self.deleted)

    def page(self, after: int, size: int) -> tuple[list[int], int | None]:
        """The positions of up to `size` live records after position `after`, and the cursor for
        the next page."""
        end = self.count + len(self.added)
        out: list[int] = []
        pos = after + 1
        while pos < end and len(out) < size:
            if pos not in self.deleted:
                out.append(pos)
            pos += 1
        more = pos < end and (end - pos) > sum(1 for p in self.deleted if p >= pos)
        return out, (pos - 1 if more else None)


class RupaSandbox:
    """State and ASGI app of the local Rupa API. Thread-safe: tests mutate it while it serves."""

    def __init__(
        self,
        patients: int = 50,
        lab_tests: int = 20,
        seed: int = 0,
        *,
        access_token_ttl: float = 3600.0,
        rotate_refresh_tokens: bool = True,
        default_page_size: int = 50,
        client_id: str = SANDBOX_RUPA_CLIENT_ID,
        client_secret: str = SANDBOX_RUPA_CLIENT_SECRET,
        faults: Faults | None = None,
        events_url: str | None = None,
        result_link_ttl: float = 600.0,
    ) -> None:
        self.seed = seed
        self.access_token_ttl = access_token_ttl
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.default_page_size = default_page_size
        self.client_id, self.client_secret = client_id, client_secret
        self.faults = faults or Faults()
        self.patients = _Records("patient", "pat_", patients, self._make_patient)
        self.lab_tests = _Records("lab_test", "labts_", lab_tests, self._make_lab_test)
        self.order_intents: dict[str, dict] = {}
        self.stats: collections.Counter[str] = collections.Counter()
        self.requests: collections.deque[str] = collections.deque(maxlen=10_000)
        self.rewrite_next: Callable[[str, str | None], str | None] | None = None
        self.answer: Callable[[Request], Response | None] | None = None
        self.token_answer: Callable[[Request], Response] | None = None
        self._identities: dict[tuple[str, str, str], int] = {}  # edited or added patients
        self._codes: dict[str, tuple[str, float]] = {}  # code -> (redirect_uri, expires)
        self._access: dict[str, float] = {}  # access token -> monotonic expiry
        self._refresh: set[str] = set()
        self._lock = threading.RLock()
        self.checkout = RupaCheckout(self, events_url=events_url, result_link_ttl=result_link_ttl)

    # ---- synthetic records -------------------------------------------------------------
    def _make_patient(self, i: int) -> dict:
        s = self.seed
        born = date(1940, 1, 1) + timedelta(days=(i * 7919 + s * 31) % 25_000)
        return {
            "first_name": _FIRST[(i * 7 + s) % len(_FIRST)],
            "last_name": _LAST[(i * 13 + s * 3) % len(_LAST)],
            "email": f"patient{i}.s{s}@example.test",
            "birthday": born.isoformat(),
            "created_at": EPOCH,
            "updated_at": EPOCH,
            "_relationships": {"clinic": {"data": {"type": "clinic", "id": "clinic_sandbox"}}},
        }

    def _make_lab_test(self, i: int) -> dict:
        lab = i % len(_LABS)
        return {
            "name": f"{_PANELS[i % len(_PANELS)]} {i // len(_PANELS) + 1}",
            "lab_name": _LABS[lab],
            "sample_types": ["blood"] if i % 2 else ["stool"],
            "price": f"{49 + (i * 17) % 400}.00",
            "created_at": EPOCH,
            "updated_at": EPOCH,
            "_relationships": {"lab_company": {"data": {"type": "lab_company", "id": f"labco_{lab}"}}},
        }

    # ---- mutation helpers for tests ------------------------------------------------------
    def _edit(self, records: _Records, rid: str, changes: dict) -> dict:
        with self._lock:
            pos = records.pos_of(rid)
            if pos is None:
                raise KeyError(rid)
            attrs = {**records.attributes(pos), **changes, "updated_at": _now_iso()}
            if pos >= records.count:
                records.added[pos - records.count] = attrs
            else:
                records.overrides[pos] = attrs
            if records is self.patients:
                self._identities = {k: v for k, v in self._identities.items() if v != pos}
                self._identities[_identity(attrs)] = pos
            return records.resource(pos)

    def update_patient(self, patient_id: str, **attributes: Any) -> dict:
        return self._edit(self.patients, patient_id, attributes)

    def update_lab_test(self, lab_test_id: str, **attributes: Any) -> dict:
        return self._edit(self.lab_tests, lab_test_id, attributes)

    def delete_patient(self, patient_id: str) -> None:
        with self._lock:
            pos = self.patients.pos_of(patient_id)
            if pos is None:
                raise KeyError(patient_id)
            self.patients.deleted.add(pos)

    def delete_lab_test(self, lab_test_id: str) -> None:
        with self._lock:
            pos = self.lab_tests.pos_of(lab_test_id)
            if pos is None:
                raise KeyError(lab_test_id)
            self.lab_tests.deleted.add(pos)

    def patient(self, patient_id: str) -> dict | None:
        with self._lock:
            pos = self.patients.pos_of(patient_id)
            return None if pos is None else self.patients.resource(pos)

    def patient_ids(self) -> list[str]:
        with self._lock:
            end = self.patients.count + len(self.patients.added)
            return [self.patients.id_of(p) for p in range(end) if p not in self.patients.deleted]

    # ---- OAuth helpers for tests ---------------------------------------------------------
    def issue_code(self, redirect_uri: str = "") -> str:
        code = secrets.token_urlsafe(16)
        with self._lock:
            self._codes[code] = (redirect_uri, time.monotonic() + 600)
        return code

    def mint_access_token(self, ttl: float | None = None) -> str:
        """A ready access token, as RUPA_API_TOKEN would hold."""
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._access[token] = time.monotonic() + (self.access_token_ttl if ttl is None else ttl)
        return token

    def revoke_all(self) -> None:
        """The practitioner disconnects the app: every access and refresh token stops working."""
        with self._lock:
            self._access.clear()
            self._refresh.clear()

    def expire_access_tokens(self) -> None:
        """Every access token expires now (refresh tokens stay valid)."""
        with self._lock:
            self._access.clear()

    def refresh_tokens(self) -> set[str]:
        with self._lock:
            return set(self._refresh)

    def _grant(self, old_refresh: str | None = None) -> dict:
        now = time.monotonic()
        access = secrets.token_urlsafe(24)
        with self._lock:
            self._access = {t: exp for t, exp in self._access.items() if exp > now}
            self._access[access] = now + self.access_token_ttl
            if old_refresh and not self.rotate_refresh_tokens:
                refresh = old_refresh
            else:
                refresh = secrets.token_urlsafe(32)
                self._refresh.discard(old_refresh or "")
                self._refresh.add(refresh)
        return {"access_token": access, "token_type": "Bearer", "expires_in": self.access_token_ttl,
                "refresh_token": refresh, "scope": "patients lab_tests orders"}

    # ---- HTTP plumbing ---------------------------------------------------------------------
    def _authorized(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        with self._lock:
            exp = self._access.get(token.strip())
            return exp is not None and exp > time.monotonic()

    def _guard(self, request: Request) -> Response | None:
        self.requests.append(f"{request.method} {request.url.path}?{request.url.query}")
        self.stats[f"{request.method} {request.url.path.rsplit('/rupa', 1)[-1]}"] += 1
        if self._authorized(request):
            return self.answer(request) if self.answer is not None else None
        self.stats["401"] += 1
        return _errors(401, "invalid_token", "Unauthorized",
                       "The access token is missing, invalid or expired.",
                       headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/patients", self._list_patients, methods=["GET"]),
            Route("/patients", self._create_patient, methods=["POST"]),
            Route("/patients/{id}", self._get_patient, methods=["GET"]),
            Route("/lab_tests", self._list_lab_tests, methods=["GET"]),
            Route("/lab_tests/{id}", self._get_lab_test, methods=["GET"]),
            Route("/order_intents", self._create_order_intent, methods=["POST"]),
            Route("/checkout/{id}", self.checkout.page, methods=["GET"]),
            Route("/checkout/{id}", self.checkout.submit_form, methods=["POST"]),
            Route("/results/{token}", self.checkout.result, methods=["GET"]),
            Route("/oauth/authorize", self._authorize, methods=["GET"]),
            Route("/oauth/token", self._token, methods=["POST"]),
        ])

    # ---- collections -----------------------------------------------------------------------
    def _list(self, request: Request, records: _Records) -> Response:
        if (denied := self._guard(request)) is not None:
            return denied
        q = request.query_params
        try:
            size = int(q.get("page[size]", self.default_page_size))
            after = int(q.get("page[after]", -1))
        except ValueError:
            return _errors(400, "invalid_page", "Invalid page parameter", source={"parameter": "page"})
        if not 1 <= size <= MAX_PAGE_SIZE:
            return _errors(400, "invalid_page_size", "Invalid page size",
                           f"page[size] must be between 1 and {MAX_PAGE_SIZE}.",
                           source={"parameter": "page[size]"})
        with self._lock:
            positions, cursor = records.page(after, size)
            data = [records.text(pos) for pos in positions]
            total = records.live()
        links = {"self": str(request.url), "next": None}
        if cursor is not None:
            links["next"] = str(request.url.replace(
                query=urlencode({"page[size]": size, "page[after]": cursor})))
        if self.rewrite_next is not None:
            links["next"] = self.rewrite_next(str(request.url), links["next"])
        # the document _doc would write, with the resources' kept JSON text spliced in
        rest = _dumps({"links": links, "meta": {"total": total}})
        return Response('{"data":[' + ",".join(data) + "]," + rest[1:], media_type=JSONAPI)

    async def _list_patients(self, request: Request) -> Response:
        return self._list(request, self.patients)

    async def _list_lab_tests(self, request: Request) -> Response:
        return self._list(request, self.lab_tests)

    def _get(self, request: Request, records: _Records) -> Response:
        if (denied := self._guard(request)) is not None:
            return denied
        with self._lock:
            pos = records.pos_of(request.path_params["id"])
            res = None if pos is None else records.resource(pos)
        if res is None:
            return _errors(404, "not_found", "Not found", f"No {records.kind} with this id.")
        return _doc({"data": res, "links": {"self": str(request.url)}})

    async def _get_patient(self, request: Request) -> Response:
        return self._get(request, self.patients)

    async def _get_lab_test(self, request: Request) -> Response:
        return self._get(request, self.lab_tests)

    # ---- POST /patients (documented de-duplication) ----------------------------------------
    async def _create_patient(self, request: Request) -> Response:
        if (denied := self._guard(request)) is not None:
            return denied
        body, bad = await _body(request, "patient")
        if bad is not None:
            return bad
        attrs = body.get("attributes") or {}
        missing = [k for k in ("first_name", "last_name", "email") if not str(attrs.get(k) or "").strip()]
        if missing:
            return _errors(422, "missing_attribute", "Missing required attribute",
                           many=[{"pointer": f"/data/attributes/{k}"} for k in missing])
        clean = {k: v for k, v in attrs.items() if not k.startswith("_")}
        key = _identity(clean)
        with self._lock:
            pos = self._find_patient(key)
            if pos is not None:
                self.stats["patient_deduplicated"] += 1
                return _doc({"data": self.patients.resource(pos)}, 200)
            now = _now_iso()
            stored = {"first_name": None, "last_name": None, "email": None, "birthday": None,
                      **clean, "created_at": now, "updated_at": now, "_relationships": {}}
            self.patients.added.append(stored)
            pos = self.patients.count + len(self.patients.added) - 1
            self._identities[key] = pos
            return _doc({"data": self.patients.resource(pos)}, 201)

    def _find_patient(self, key: tuple[str, str, str]) -> int | None:
        pos = self._identities.get(key)
        if pos is not None:
            return pos if pos not in self.patients.deleted else None
        email = key[2]  # generated patients: the email names the index
        if email.startswith("patient") and email.endswith(f".s{self.seed}@example.test"):
            idx = email[len("patient"):].split(".", 1)[0]
            if idx.isdigit() and int(idx) < self.patients.count:
                i = int(idx)
                if i not in self.patients.overrides and i not in self.patients.deleted:
                    if _identity(self._make_patient(i)) == key:
                        return i
        return None

    # ---- POST /order_intents -----------------------------------------------------------------
    async def _create_order_intent(self, request: Request) -> Response:
        if (denied := self._guard(request)) is not None:
            return denied
        body, bad = await _body(request, "order_intent")
        if bad is not None:
            return bad
        attrs = body.get("attributes") or {}
        rels = body.get("relationships") or {}
        if not str(attrs.get("return_url") or "").strip():
            return _errors(422, "missing_attribute", "Missing required attribute",
                           source={"pointer": "/data/attributes/return_url"})
        patient_ref = ((rels.get("patient") or {}).get("data") or {})
        tests_ref = ((rels.get("lab_tests") or {}).get("data") or [])
        with self._lock:
            if not patient_ref.get("id") or self.patients.pos_of(str(patient_ref["id"])) is None:
                return _errors(422, "invalid_relationship", "Unknown patient",
                               source={"pointer": "/data/relationships/patient"})
            unknown = [t.get("id") for t in tests_ref if self.lab_tests.pos_of(str(t.get("id"))) is None]
            if unknown:
                return _errors(422, "invalid_relationship", "Unknown lab test",
                               source={"pointer": "/data/relationships/lab_tests"})
            oid = f"ordin_{len(self.order_intents) + 1:06d}"
            base = str(request.url).rsplit("/order_intents", 1)[0]
            resource = {
                "type": "order_intent",
                "id": oid,
                "attributes": {"return_url": attrs["return_url"], "checkout_url": f"{base}/checkout/{oid}",
                               "created_at": _now_iso()},
                "relationships": {
                    "patient": {"data": {"type": "patient", "id": patient_ref["id"]}},
                    "lab_tests": {"data": [{"type": "lab_test", "id": t["id"]} for t in tests_ref]},
                },
            }
            self.order_intents[oid] = resource
        return _doc({"data": resource}, 201)

    # ---- OAuth2 ------------------------------------------------------------------------------
    async def _authorize(self, request: Request) -> Response:
        """Stands in for the practitioner's consent screen: approves at once and redirects."""
        q = request.query_params
        if q.get("client_id") != self.client_id or q.get("response_type") != "code" or not q.get("redirect_uri"):
            return JSONResponse({"error": "invalid_request"}, status_code=400)
        code = self.issue_code(q["redirect_uri"])
        params = {"code": code, **({"state": q["state"]} if q.get("state") else {})}
        sep = "&" if "?" in q["redirect_uri"] else "?"
        return RedirectResponse(f"{q['redirect_uri']}{sep}{urlencode(params)}", status_code=302)

    async def _token(self, request: Request) -> Response:
        if self.token_answer is not None:
            return self.token_answer(request)
        form = await request.form()
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        basic = request.headers.get("authorization", "")
        if basic.lower().startswith("basic "):
            try:
                client_id, _, client_secret = base64.b64decode(basic[6:]).decode().partition(":")
            except ValueError:
                client_id = client_secret = None
        if client_id != self.client_id or client_secret != self.client_secret:
            return _oauth_error(401, "invalid_client")
        grant = form.get("grant_type")
        self.stats[f"grant:{grant}"] += 1
        if grant == "authorization_code":
            with self._lock:
                entry = self._codes.pop(str(form.get("code") or ""), None)  # single use
            if entry is None or entry[1] < time.monotonic():
                return _oauth_error(400, "invalid_grant")
            if entry[0] and entry[0] != form.get("redirect_uri"):
                return _oauth_error(400, "invalid_grant")
            return _token_response(self._grant())
        if grant == "refresh_token":
            old = str(form.get("refresh_token") or "")
            with self._lock:
                if old not in self._refresh:
                    self.stats["refresh_refused"] += 1
                    return _oauth_error(400, "invalid_grant")
                return _token_response(self._grant(old))
        return _oauth_error(400, "unsupported_grant_type")


def _identity(attrs: dict) -> tuple[str, str, str]:
    return (str(attrs.get("first_name") or "").strip(), str(attrs.get("last_name") or "").strip(),
            str(attrs.get("email") or "").strip().lower())


_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _doc(document: dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(_dumps(document), status_code=status, media_type=JSONAPI, headers=headers)


def _errors(status: int, code: str, title: str, detail: str | None = None, *,
            source: dict | None = None, many: list[dict] | None = None,
            headers: dict | None = None) -> Response:
    def one(src: dict | None) -> dict:
        err: dict[str, Any] = {"status": str(status), "code": code, "title": title}
        if detail:
            err["detail"] = detail
        if src:
            err["source"] = src
        return err

    errors = [one(s) for s in many] if many else [one(source)]
    return _doc({"errors": errors}, status, headers)


def _oauth_error(status: int, error: str) -> Response:
    return JSONResponse({"error": error}, status_code=status, headers={"Cache-Control": "no-store"})


def _token_response(payload: dict) -> Response:
    return JSONResponse(payload, headers={"Cache-Control": "no-store"})


async def _body(request: Request, kind: str) -> tuple[dict, Response | None]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip()
    if ctype not in (JSONAPI, "application/json"):
        return {}, _errors(415, "unsupported_media_type", "Unsupported media type",
                           f"Send {JSONAPI}.")
    try:
        doc = json.loads(await request.body())
    except ValueError:
        return {}, _errors(400, "invalid_json", "Request body is not JSON")
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, dict) or data.get("type") != kind:
        return {}, _errors(409, "invalid_type", "Wrong resource type",
                           f"data.type must be {kind!r}.", source={"pointer": "/data/type"})
    return data, None
