"""The LetsGetChecked order client: one idempotent PUT per order, its answer turned into an
`Outcome` the ledger can store.

Status handling (the PUT Order document + issues 3 and 10):

    2xx           accepted   only when the body is the documented order: a JSON object whose
                             clientOrderId is the one sent and whose orderItems is a non-empty
                             list of items with ids (kept). Anything else (an HTML page from a
                             proxy, invalid JSON, no orderItems) is `unconfirmed`: never counted
                             as accepted, sent again on a later run (the PUT is idempotent)
    400           rejected   the vendor's reason, structured parts only (see below)
    409           conflict   already submitted with other data; not retried, not a batch error
    401           failed     after one token refresh; `stop` is set: the batch stops
    404/406/410/415 and anything else unexpected: failed with a plain cause
    429/5xx, timeouts, broken connections: retried by the shared policy (etl.http), honouring
                  Retry-After up to LGC_MAX_RETRY_AFTER (a longer ask fails the row at once),
                  then failed

Every attempt first waits for the vendor budget (etl.lgc.budget: the deployment-wide rate and
concurrency limits) and asks the load's breaker (etl.lgc.breaker) whether it may start; its
result tells the breaker whether the vendor is failing.

Paths: `order_url` is the final guard for ids in the URL. clientId and clientOrderId must be
ids that travel unchanged (schemas.columns.path_id_problem, the rule validation applies), and
the finished URL must read back, through httpx's own parser, as exactly the path we meant.
Otherwise nothing is sent and the row is rejected locally.

Answers are read as a stream under `LgcSettings.max_response_bytes` (1 MiB): past it reading
stops, and the cut answer is an error with a plain reason.

PHI: a vendor's free text (`detail`, raw bodies) may echo the request (names, dob, the bearer
token). Only the structured parts of its errors are kept: the HTTP status, the Problem Details
`title` and `type` when they look like fixed strings, and the names of the fields it blames
(etl.redact). Every `Outcome.error` passes the one redaction point before it is stored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from etl.errors import ApiError, AuthError, UnsafeIdError, size_text
from etl.http import (
    NO_COMPRESSION,
    RETRYABLE_STATUSES,
    TOKEN_ANSWER_LIMIT,
    USER_AGENT,
    RetryableStatus,
    RetryAfterTooLong,
    aread_capped,
    asend_capped,
    async_retrying,
    describe_transport_error,
    make_async_client,
    over_cap,
    parse_retry_after,
    raise_for_retryable,
)
from etl.lgc.auth import TokenProvider
from etl.lgc.breaker import AGAIN, Breaker, Tripped
from etl.lgc.budget import Aborted, AsyncBudget
from etl.redact import clean, escape_controls, field_names, fixed_text
from etl.settings import LgcSettings, RetrySettings
from etl.states import SETTLED_ORDER_STATES, OrderState
from schemas.columns import path_id_problem

log = logging.getLogger(__name__)

# The ledger's state names live in etl.states; these aliases keep call sites short.
ACCEPTED, REJECTED, CONFLICT = OrderState.ACCEPTED, OrderState.REJECTED, OrderState.CONFLICT
FAILED, PENDING, UNCONFIRMED = OrderState.FAILED, OrderState.PENDING, OrderState.UNCONFIRMED
TERMINAL = SETTLED_ORDER_STATES
MAX_REASON = 500

_FAILED_CAUSES = {
    401: "LetsGetChecked refused the credentials (HTTP 401) even after a fresh token; "
    "check LGC_ACCESS_KEY/LGC_SECRET_KEY or LGC_API_TOKEN",
    404: "HTTP 404 Not Found: unknown clientId or wrong LGC_BASE_URL",
    406: "HTTP 406 Not Acceptable: the API cannot answer in application/json",
    410: "HTTP 410 Gone: this API version or resource is no longer available",
    415: "HTTP 415 Unsupported Media Type: the API did not accept the JSON body",
}

# Every field name of the PUT Order document (request and response), for telling the field
# names in an error apart from echoed values. Compared case-insensitively.
LGC_FIELDS = frozenset("""
    address addressLine1 addressLine2 city countryIsoAlpha2 postalCode state patientInfo
    participantId firstName middleName lastName email phoneNumber phoneCountryCode gender dob
    ethnicity race participantLanguage healthPlanName programCode orderItems code quantity id
    diagnosisCodes physicianInfo npi primaryCareProvider phone phone2 fax vendorName insurance
    insurancePlan policyNumber planName hierarchy groupName groupNumber customData key value note
    clientOrderId clientId body request model payload
""".split())
MAX_ORDER_ITEM_TEXT = 100  # an order item's code or id longer than this is not a plain id


@dataclass(frozen=True)
class Outcome:
    """What happened to one PUT. `error` passes the redaction point (etl.redact.clean) here, so
    whatever builds an Outcome, the ledger only ever stores clean text. `stop` asks the loader
    to stop the batch."""

    state: str
    http_status: int | None = None
    order_item_ids: list | None = None
    attempts: int = 0
    error: str | None = None
    stop: bool = False

    def __post_init__(self) -> None:
        if self.error is not None:
            object.__setattr__(self, "error", clean(self.error, limit=MAX_REASON))


def _strings(value: Any) -> list[str]:
    """Every string (and number) in a request body: the values an answer must not echo."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, int) and not isinstance(value, bool):
        return [str(value)]
    return []


def _keys(value: Any) -> set[str]:
    if isinstance(value, Mapping):
        return {str(k) for k in value} | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list | tuple):
        return {k for v in value for k in _keys(v)}
    return set()


def _json(response: httpx.Response) -> Any:
    if over_cap(response) or not response.content:
        return None
    try:
        return json.loads(response.content)
    except ValueError:
        return None


def _blamed(errors: Any) -> Iterable[object]:
    """Field names from an `errors` member: ASP.NET's {field: [messages]}, or a list of
    {field|name|propertyName|pointer|source.pointer}."""
    if isinstance(errors, Mapping):
        return list(errors)
    if isinstance(errors, list):
        out = []
        for e in errors:
            if isinstance(e, Mapping):
                found = e.get("source")
                source = found if isinstance(found, Mapping) else {}
                out.append(e.get("field") or e.get("name") or e.get("propertyName")
                           or e.get("pointer") or source.get("pointer"))
        return out
    return []


def problem_parts(response: httpx.Response, body: Mapping[str, Any] | None) -> str:
    """The structured parts of an error answer that may be kept, as one phrase:
    `<title> [<type>]; fields: a, b` (each part only when it passes etl.redact's tests)."""
    doc = _json(response)
    if not isinstance(doc, Mapping):
        return ""
    values = _strings(body or {})
    title = fixed_text(doc.get("title"), values)
    kind = fixed_text(doc.get("type"), values, max_len=200, max_digits=4, uri=True)
    fields, dropped = field_names(_blamed(doc.get("errors")), values, known=LGC_FIELDS | _keys(body or {}))
    text = title or ""
    if kind and kind != "about:blank":
        text += f" [{kind}]"
    if fields or dropped:
        listed = ", ".join(fields) + (f" (+{dropped} not shown)" if dropped else "")
        text += ("; " if text else "") + "fields: " + listed.lstrip(" ")
    return text.strip()


def vendor_reason(response: httpx.Response, body: Mapping[str, Any] | None) -> str:
    """`HTTP 400 <title> [<type>]; fields: a, b`: only the structured parts of the answer, never
    its free text. Without a usable title, the standard phrase for the status."""
    status = response.status_code
    parts = problem_parts(response, body)
    if over_cap(response):
        return f"HTTP {status} (the answer was larger than the cap and was not read)"
    if not parts or parts.startswith("fields:"):
        phrase = httpx.codes.get_reason_phrase(status)
        parts = f"{phrase}; {parts}" if parts else phrase
    return f"HTTP {status} {parts}".strip()


def _plain_id(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return True
    return (isinstance(value, str) and 0 < len(value) <= MAX_ORDER_ITEM_TEXT
            and escape_controls(value) == value and value.strip() == value)


def confirmed_order(response: httpx.Response, client_order_id: str) -> tuple[list | None, str | None]:
    """(order-item ids, None) when a 2xx carries the documented order for `client_order_id`,
    else (None, why not) with a PHI-free reason."""
    if over_cap(response):
        return None, "its answer was larger than the cap and was not read"
    if not response.content:
        return None, "its answer was empty"
    doc = _json(response)
    if doc is None:
        return None, "its answer was not JSON"
    if not isinstance(doc, Mapping):
        return None, "its answer was not a JSON object"
    if doc.get("clientOrderId") != client_order_id:
        return None, ("its answer named another clientOrderId" if doc.get("clientOrderId") is not None
                      else "its answer had no clientOrderId")
    items = doc.get("orderItems")
    if not isinstance(items, list) or not items:
        return None, "its answer had no orderItems"
    out = []
    for item in items:
        if not isinstance(item, Mapping) or not _plain_id(item.get("id")):
            return None, "an order item in its answer had no plain id"
        code = item.get("code")
        out.append({"code": code if _plain_id(code) else None, "id": item.get("id")})
    return out, None


def order_url(lgc: LgcSettings, client_order_id: str) -> str:
    """`{base}/{clientId}/api/v2/orders/{clientOrderId}`, or UnsafeIdError (nothing is sent)
    when an id could be changed on its way or the URL would not read back as this path."""
    return _checked_order_url(lgc, client_order_id)[0]


def _checked_order_url(lgc: LgcSettings, client_order_id: str) -> tuple[str, httpx.URL]:
    """`order_url` and the URL as httpx parsed it for the check (parsing is the dear part; the
    client sends that very object instead of parsing the string again)."""
    for what, value in (("clientId", lgc.client_id), ("clientOrderId", client_order_id)):
        problem = path_id_problem(value)
        if problem:
            shown = escape_controls(value if len(value) <= 100 else value[:99] + "…")
            raise UnsafeIdError(f"{what} {shown!r} cannot be sent safely in the URL: it {problem}")
    tail = f"/{quote(lgc.client_id, safe='')}/api/v2/orders/{quote(client_order_id, safe='')}"
    url = f"{lgc.base_url}{tail}"
    expected = (urlsplit(lgc.base_url).path + tail).encode("ascii")
    parsed = httpx.URL(url)
    if parsed.raw_path != expected:
        raise UnsafeIdError("the order URL cannot be sent safely: it would not reach "
                            "{clientId}/api/v2/orders/{clientOrderId} unchanged; check LGC_BASE_URL")
    return url, parsed


@dataclass
class LgcClient:
    """PUTs orders; the token, the vendor budget, the breaker and the retry policy are shared by
    all workers of a load.

    `http` (from etl.http.make_async_client: httpx's own transport, the connection's proxy, CA
    bundle, client certificate and timeout) fetches tokens and sends the PUTs. The loader gives
    each worker its own one-connection client (a shared pool costs O(pool) bookkeeping per
    request in httpcore). Each order's request is built once per token and sent again as it is
    by each retry."""

    lgc: LgcSettings
    retry: RetrySettings
    http: httpx.AsyncClient
    tokens: TokenProvider
    budget: AsyncBudget | None = None  # None: no limit (tests of the client alone)
    breaker: Breaker = field(default_factory=Breaker)  # default: never opens

    def __post_init__(self) -> None:
        self._timeout = httpx.Timeout(self.lgc.network.timeout or self.retry.timeout).as_dict()
        # built once, not per PUT; the bearer token is the auth's to add (etl.lgc.auth)
        self._headers = httpx.Headers({"User-Agent": USER_AGENT, **NO_COMPRESSION,
                                       "Accept": "application/json", "Content-Type": "application/json"})
        # the Authorization header is the auth's (etl.lgc.auth), put on at each send
        if self.tokens.http is None:
            self.tokens.http = self.http

    def order_url(self, client_order_id: str) -> str:
        return order_url(self.lgc, client_order_id)

    @staticmethod
    def headers(token: str) -> dict[str, str]:
        """What a PUT carries (the dry run shows them with the token masked)."""
        return {"Authorization": f"Bearer {token}", "Accept": "application/json",
                "Content-Type": "application/json"}

    def _request(self, url: httpx.URL, content: bytes) -> httpx.Request:
        return httpx.Request("PUT", url, content=content, headers=self._headers,
                             extensions={"timeout": self._timeout})

    async def _send(self, request: httpx.Request) -> httpx.Response:
        """One attempt: wait for the budget, start only if the breaker allows, tell it how the
        vendor did. The answer is read under the size cap (etl.http.aread_capped). Raises
        Tripped instead of sending once the breaker is open. `request` is built once per order
        and token and sent again as it is by each retry (its body is bytes: replayable)."""
        breaker, budget = self.breaker, self.budget
        if budget is not None and not budget.try_acquire():
            try:
                await budget.acquire(breaker.future)
            except Aborted:
                breaker.check()
                raise
        try:
            breaker.check()
            try:
                response = await aread_capped(await self.http.send(request, auth=self.tokens, stream=True),
                                              request, self.lgc.max_response_bytes)
            except httpx.TransportError as exc:
                breaker.failure("timed out" if isinstance(exc, httpx.TimeoutException)
                                else "connection failed")
                raise
        finally:
            if budget is not None:
                budget.release()
        self._observe(response)
        return response

    def _observe(self, response: httpx.Response) -> None:
        status = response.status_code
        if status in RETRYABLE_STATUSES:
            asked = parse_retry_after(response.headers.get("Retry-After"))
            if asked is not None and asked > self.lgc.max_retry_after:
                self.breaker.failure(f"HTTP {status} with Retry-After {asked:.0f}s")
                return
        if status >= 500:
            self.breaker.failure(f"HTTP {status}")
        elif status != 429:
            self.breaker.success()

    async def put_order(self, client_order_id: str, body: Mapping[str, Any] | None, content: bytes) -> Outcome:
        """PUT one order (body already serialised as `content`) and classify the answer. `body`
        may be None: it is then parsed from `content` only if an error answer needs it (to
        tell the fields it names from echoed values)."""
        try:
            _, url = _checked_order_url(self.lgc, client_order_id)
        except UnsafeIdError as exc:  # validation refuses such ids; this is the last guard
            return Outcome(REJECTED, None, attempts=0, error=f"not sent: {exc}")
        attempts = 0
        last: str | None = None  # what went wrong with the previous attempt (for the reason)
        status: int | None = None
        request = self._request(url, content)  # built once, sent again as it is by each retry

        async def once() -> httpx.Response:
            """One attempt: the auth (etl.lgc.auth) adds the token and, after a 401, refreshes it
            and tries once more: both PUTs count as attempts."""
            nonlocal attempts, last, status
            attempts += 1
            try:
                response = await self._send(request)
            except Tripped:
                attempts -= 1  # never started
                raise
            except httpx.TransportError as exc:
                last = describe_transport_error(exc)
                raise
            attempts += len(response.history)  # the 401 the auth retried after
            status, last = response.status_code, f"HTTP {response.status_code}"
            return raise_for_retryable(response, max_retry_after=self.lgc.max_retry_after)

        try:
            # The first attempt runs outside tenacity (setting up its loop costs as much as the
            # rest of a PUT's Python work); an error goes into the loop as its first attempt, so
            # waits, logs and the attempt count are the policy's own, unchanged.
            first: list[Exception] = []
            try:
                response = await once()
            except Exception as exc:
                first.append(exc)
            if first:
                async for attempt in async_retrying(self.retry, sleep=self.breaker.sleep,
                                                    max_retry_after=self.lgc.max_retry_after):
                    with attempt:
                        if first:
                            raise first.pop()
                        response = await once()
        except Tripped:
            error = (self.breaker.reason if not attempts or last is None
                     else self.breaker.reason_after(last, attempts))
            return Outcome(FAILED, status, attempts=attempts, error=error)
        except RetryAfterTooLong as exc:
            return Outcome(
                FAILED, exc.response.status_code, attempts=attempts,
                error=f"HTTP {exc.response.status_code}: LetsGetChecked asked to wait "
                f"{exc.asked:.0f}s (Retry-After), more than LGC_MAX_RETRY_AFTER ({exc.cap:g}s); {AGAIN}",
            )
        except (RetryableStatus, httpx.TransportError) as exc:
            status = exc.response.status_code if isinstance(exc, RetryableStatus) else None
            return Outcome(
                FAILED, status, attempts=attempts,
                error=f"{describe_transport_error(exc)} ({attempts} attempts)",
            )
        if body is None and not 200 <= response.status_code < 300:
            body = _body_of(content)
        return classify(response, body, attempts, client_order_id, self.lgc.max_response_bytes)


def _body_of(content: bytes) -> Mapping[str, Any] | None:
    try:
        body = json.loads(content)
    except ValueError:
        return None
    return body if isinstance(body, Mapping) else None


def classify(response: httpx.Response, body: Mapping[str, Any] | None, attempts: int,
             client_order_id: str, limit: int | None = None) -> Outcome:
    status = response.status_code
    cap = f" ({size_text(limit)}, LGC_MAX_RESPONSE_BYTES)" if limit and over_cap(response) else ""
    if 200 <= status < 300:
        items, why = confirmed_order(response, client_order_id)
        if items is not None:
            return Outcome(ACCEPTED, status, items, attempts)
        if over_cap(response):
            why = f"its answer was larger than the cap{cap} and was not read"
        return Outcome(UNCONFIRMED, status, attempts=attempts, error=(
            f"HTTP {status} but {why}, so it is not the documented order: not counted as "
            "accepted; sent again on the next run (the PUT is idempotent)"))
    if over_cap(response):
        reason = f"HTTP {status}; the answer was larger than the cap{cap} and was not read"
    else:
        reason = None
    if status == 400:
        return Outcome(REJECTED, status, attempts=attempts, error=reason or vendor_reason(response, body))
    if status == 409:
        return Outcome(
            CONFLICT, status, attempts=attempts,
            error="HTTP 409: already submitted with different data; LetsGetChecked keeps the first order",
        )
    if status == 401:
        return Outcome(FAILED, status, attempts=attempts, error=_FAILED_CAUSES[401], stop=True)
    cause = _FAILED_CAUSES.get(status)
    if cause is None:
        parts = problem_parts(response, body)
        cause = f"unexpected HTTP {status} from LetsGetChecked" + (f": {parts}" if parts else "")
    return Outcome(FAILED, status, attempts=attempts, error=reason or cause)


CHECK_ORDER_ID = "labsync-connection-test"  # an order nobody creates: asked for, never sent


async def check_credentials(lgc: LgcSettings, retry: RetrySettings) -> str:
    """Prove that these settings reach LetsGetChecked and that it accepts the credentials (the
    Airflow Test button, etl.airflow.hooks). Keys: a real token from the token endpoint. A ready
    token cannot be fetched, so it is shown to the order API with a GET of an order that does not
    exist: 404 means the token was accepted, 401/403 that it was not. Nothing is created.

    Returns one sentence without secrets; raises ConfigError, AuthError or ApiError."""
    lgc = lgc.validated()
    async with make_async_client(lgc.base_url, retry, lgc.network, concurrency=1) as client:
        auth = TokenProvider(lgc, retry, client)
        if not lgc.api_token:
            await auth.token()
            return f"LetsGetChecked issued a token for client {lgc.client_id} at {lgc.base_url}"
        request = client.build_request("GET", order_url(lgc, CHECK_ORDER_ID), headers={
            "Accept": "application/json", **NO_COMPRESSION})
        try:
            response = await asend_capped(client, request, TOKEN_ANSWER_LIMIT, auth=auth)
        except httpx.TransportError as exc:
            raise ApiError(f"could not reach LetsGetChecked: {describe_transport_error(exc)}") from None
    if response.status_code in (401, 403):
        raise AuthError(f"LetsGetChecked refused the access token (HTTP {response.status_code})",
                        status=response.status_code)
    if response.status_code not in (200, 404):
        raise ApiError(f"LetsGetChecked answered HTTP {response.status_code} to a test GET",
                       status=response.status_code)
    return f"LetsGetChecked accepted the access token for client {lgc.client_id} at {lgc.base_url}"
