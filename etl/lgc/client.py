"""The LetsGetChecked order client: one idempotent PUT per order, its answer turned into an
`Outcome` the ledger can store.

Status handling (the PUT Order document + issue 3):

    200/201/202   accepted   order-item ids kept
    400           rejected   the vendor's reason (Problem Details title/detail, masked, see below)
    409           conflict   already submitted with other data; not retried, not a batch error
    401           failed     after one token refresh; `stop` is set: the batch stops
    404/406/410/415 and anything else unexpected: failed with a plain cause
    429/5xx, timeouts, broken connections: retried by the shared policy (etl.http), honouring
                  Retry-After up to LGC_MAX_RETRY_AFTER (a longer ask fails the row at once),
                  then failed

Every attempt first waits for the vendor budget (etl.lgc.budget: the deployment-wide rate and
concurrency limits) and asks the load's breaker (etl.lgc.breaker) whether it may start; its
result tells the breaker whether the vendor is failing.

PHI: the vendor's `detail` may echo the values it disliked. `mask_reason` replaces every string
value of the order's body found in it (and anything shaped like an email, a date or a phone
number) with `***` before it is stored or shown; nothing of the body is ever logged.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from etl.http import (
    RETRYABLE_STATUSES,
    USER_AGENT,
    RetryableStatus,
    RetryAfterTooLong,
    async_retrying,
    describe_transport_error,
    parse_retry_after,
    raise_for_retryable,
)
from etl.lgc.auth import TokenProvider
from etl.lgc.breaker import AGAIN, Breaker, Tripped
from etl.lgc.budget import Aborted, AsyncBudget
from etl.settings import LgcSettings, RetrySettings
from etl.states import SETTLED_ORDER_STATES, OrderState

log = logging.getLogger(__name__)

# The ledger's state names live in etl.states; these aliases keep call sites short.
ACCEPTED, REJECTED, CONFLICT = OrderState.ACCEPTED, OrderState.REJECTED, OrderState.CONFLICT
FAILED, PENDING = OrderState.FAILED, OrderState.PENDING
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

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_DATE = re.compile(r"\b\d{4}-\d{1,2}-\d{1,2}\b|\b\d{1,2}/\d{1,2}/\d{2,4}\b")
_PHONEISH = re.compile(r"\+?\d[\d\s().-]{5,}\d")


@dataclass(frozen=True)
class Outcome:
    """What happened to one PUT. `error` is PHI-free. `stop` asks the loader to stop the batch."""

    state: str
    http_status: int | None = None
    order_item_ids: list | None = None
    attempts: int = 0
    error: str | None = None
    stop: bool = False


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, int) and not isinstance(value, bool):
        return [str(value)]
    return []


def mask_reason(text: str, body: Mapping[str, Any] | None) -> str:
    """Remove anything of the order's own data (and PHI-shaped strings) from a vendor message."""
    values = sorted({s for s in _strings(body or {}) if len(s) >= 3}, key=len, reverse=True)
    for value in values:
        text = re.sub(re.escape(value), "***", text, flags=re.IGNORECASE)
    text = _EMAIL.sub("***", text)
    text = _DATE.sub("***", text)
    text = _PHONEISH.sub("***", text)
    text = " ".join(text.split())
    return text[:MAX_REASON]


def vendor_reason(response: httpx.Response, body: Mapping[str, Any] | None) -> str:
    """`HTTP 400 <title>: <detail>` from a Problem Details body, else the raw text; masked."""
    title = detail = None
    try:
        data = response.json()
        if isinstance(data, Mapping):
            title, detail = data.get("title"), data.get("detail")
            if not detail and isinstance(data.get("errors"), Mapping):
                detail = "; ".join(
                    f"{k}: {' '.join(map(str, v)) if isinstance(v, list) else v}"
                    for k, v in data["errors"].items()
                )
    except ValueError:
        pass
    if title is None and detail is None:
        detail = response.text
    parts = [p for p in (str(title) if title else None, str(detail) if detail else None) if p]
    return f"HTTP {response.status_code} " + mask_reason(": ".join(parts), body)


def _order_items(response: httpx.Response) -> list | None:
    try:
        data = response.json()
    except ValueError:
        return None
    items = data.get("orderItems") if isinstance(data, Mapping) else None
    if not isinstance(items, list):
        return None
    return [
        {"code": i.get("code"), "id": i.get("id")} for i in items if isinstance(i, Mapping)
    ]


def order_url(lgc: LgcSettings, client_order_id: str) -> str:
    """`{base}/{clientId}/api/v2/orders/{clientOrderId}`, both path parts URL-encoded."""
    return (
        f"{lgc.base_url}/{quote(lgc.client_id, safe='')}/api/v2/orders/"
        f"{quote(client_order_id, safe='')}"
    )


@dataclass
class LgcClient:
    """PUTs orders; the token, the vendor budget, the breaker and the retry policy are shared by
    all workers of a load.

    `http` (from etl.http.make_async_client) fetches tokens and sends the PUTs, unless a
    `transport` is given: the loader hands each worker its own one-connection transport and
    sends the prepared request straight to it. The client layer on top (URL merging, cookies,
    redirects, auth flows) does nothing for a PUT whose headers are already complete, yet costs
    about a third of the CPU of each request; at hundreds of orders a second that is the
    difference between meeting concurrency / latency or not (bench/load.py)."""

    lgc: LgcSettings
    retry: RetrySettings
    http: httpx.AsyncClient
    tokens: TokenProvider
    budget: AsyncBudget | None = None  # None: no limit (tests of the client alone)
    transport: httpx.AsyncBaseTransport | None = None
    breaker: Breaker = field(default_factory=Breaker)  # default: never opens

    def __post_init__(self) -> None:
        self._timeout = httpx.Timeout(self.retry.timeout).as_dict()

    def order_url(self, client_order_id: str) -> str:
        return order_url(self.lgc, client_order_id)

    @staticmethod
    def headers(token: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            "Content-Type": "application/json",
        }

    async def _send(self, url: str, content: bytes, token: str) -> httpx.Response:
        """One attempt: wait for the budget, start only if the breaker allows, tell it how the
        vendor did. Raises Tripped instead of sending once the breaker is open."""
        breaker, budget = self.breaker, self.budget
        if budget is not None and not budget.try_acquire():
            try:
                await budget.acquire(breaker.future)
            except Aborted:
                breaker.check()
                raise
        try:
            breaker.check()
            request = httpx.Request(
                "PUT", url, content=content,
                headers={"User-Agent": USER_AGENT, **self.headers(token)},
                extensions={"timeout": self._timeout},
            )
            try:
                if self.transport is None:
                    response = await self.http.send(request)
                else:
                    response = await self.transport.handle_async_request(request)
                    try:
                        await response.aread()
                    finally:
                        await response.aclose()
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

    async def put_order(self, client_order_id: str, body: Mapping[str, Any], content: bytes) -> Outcome:
        """PUT one order (body already serialised as `content`) and classify the answer."""
        url = self.order_url(client_order_id)
        attempts = 0
        refreshed = False
        last: str | None = None  # what went wrong with the previous attempt (for the reason)
        status: int | None = None

        async def send(token: str) -> httpx.Response:
            nonlocal attempts, last, status
            attempts += 1
            try:
                response = await self._send(url, content, token)
            except Tripped:
                attempts -= 1  # never started
                raise
            except httpx.TransportError as exc:
                last = describe_transport_error(exc)
                raise
            status, last = response.status_code, f"HTTP {response.status_code}"
            return response

        async def once() -> httpx.Response:
            nonlocal refreshed
            token = await self.tokens.token(self.http)
            response = await send(token)
            if response.status_code == 401 and not refreshed:
                refreshed = True
                new = await self.tokens.refresh(self.http, token)
                if new is not None:
                    log.info("order %s: HTTP 401, retrying once with a fresh token", client_order_id)
                    response = await send(new)
            return raise_for_retryable(response, max_retry_after=self.lgc.max_retry_after)

        try:
            async for attempt in async_retrying(self.retry, sleep=self.breaker.sleep,
                                                max_retry_after=self.lgc.max_retry_after):
                with attempt:
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
        return classify(response, body, attempts)


def classify(response: httpx.Response, body: Mapping[str, Any] | None, attempts: int) -> Outcome:
    status = response.status_code
    if status in (200, 201, 202):
        return Outcome(ACCEPTED, status, _order_items(response), attempts)
    if status == 400:
        return Outcome(REJECTED, status, attempts=attempts, error=vendor_reason(response, body))
    if status == 409:
        return Outcome(
            CONFLICT, status, attempts=attempts,
            error="HTTP 409: already submitted with different data; LetsGetChecked keeps the first order",
        )
    if status == 401:
        return Outcome(FAILED, status, attempts=attempts, error=_FAILED_CAUSES[401], stop=True)
    cause = _FAILED_CAUSES.get(status) or f"unexpected HTTP {status} from LetsGetChecked"
    return Outcome(FAILED, status, attempts=attempts, error=cause)
