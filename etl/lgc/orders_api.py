"""LetsGetChecked after the PUT: GET an order, PATCH-cancel an item, GET results by barcode.

    GET   {clientId}/api/v2/orders/{clientOrderId}                          -> LgcOrder | None (404)
    PATCH {clientId}/api/v2/orders/{clientOrderId}/orderItem/{orderItemId}  -> CancelAnswer
    GET   {clientId}/api/v1/results/{barcode}?alphaCode=…      (JSON)       -> bytes | None (404)
    GET   {clientId}/api/v1/labresults/{barcode}?alphaCode=…   (HL7 2.3)    -> bytes | None (404)

Everything a load shares is shared here too: the OAuth token (`etl.lgc.auth.TokenProvider`, one
refresh after a 401), the one retry policy (`etl.http`: 429/5xx/timeouts, Retry-After capped at
`LGC_MAX_RETRY_AFTER`), the vendor budget (`etl.lgc.budget.AsyncBudget`: with the warehouse's
engine these GETs and PATCHes share `LGC_RATE_LIMIT` and `LGC_CONCURRENCY` with every loader of
the deployment), answers read under `LGC_MAX_RESPONSE_BYTES`, and the order path
(`etl.lgc.client.order_url`).

Parsing is tolerant where LetsGetChecked's documents are vague: an item's `status` may be
`{"code": "KitRegistered"}` or a plain string, key casing varies (`shipment` carries
`OutboundTrackingNumber`), timestamps have up to seven fractional digits. Status codes are
matched case-insensitively to `etl.states.ItemStatus`; an unknown code is kept as given.

Nothing here logs or raises with a response body: orders and results carry PHI.

`get_order(settings, client_order_id)` is the one-call synchronous form (e.g. to confirm an
order whose PUT answer was not conclusive): the parsed order, or None when LetsGetChecked does
not know it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from etl.errors import ApiError, AuthError, Unreachable
from etl.http import (
    USER_AGENT,
    RetryableStatus,
    RetryAfterTooLong,
    aread_capped,
    async_retrying,
    describe_transport_error,
    make_async_client,
    over_cap,
    raise_for_retryable,
    unreachable,
)
from etl.lgc.auth import TokenProvider
from etl.lgc.budget import AsyncBudget
from etl.lgc.client import order_url
from etl.settings import LgcSettings, RetrySettings, Settings
from etl.states import ItemStatus

log = logging.getLogger(__name__)

HL7 = "application/hl7"
T = TypeVar("T")
_CANONICAL = {s.value.casefold(): s.value for s in ItemStatus}


# ---- parsing -------------------------------------------------------------------------------

def get_field(data: Any, *names: str) -> Any:
    """`data[name]` for the first of `names` present, matching keys case-insensitively."""
    if not isinstance(data, Mapping):
        return None
    for name in names:
        if name in data:
            return data[name]
    folded = {str(k).casefold(): v for k, v in data.items()}
    for name in names:
        if name.casefold() in folded:
            return folded[name.casefold()]
    return None


def text_of(value: Any, limit: int = 100) -> str | None:
    if value is None or isinstance(value, Mapping | list):
        return None
    text = str(value).strip()
    return text[:limit] or None


def status_code(value: Any) -> str | None:
    """An item status from `{"code": "..."}`, a plain string, or `{"name"|"status"|"value": ...}`,
    spelled as `ItemStatus` spells it when it is one of the documented codes."""
    if isinstance(value, Mapping):
        value = get_field(value, "code", "name", "status", "value")
        if isinstance(value, Mapping):  # {"status": {"code": ...}}
            return status_code(value)
    text = text_of(value, 40)
    if text is None:
        return None
    return _CANONICAL.get(text.replace(" ", "").casefold(), text)


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 timestamp (UTC when no offset is given) or None if it is not one."""
    text = text_of(value, 64)
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


@dataclass(frozen=True)
class OrderItem:
    """One order item as GET Order v2 describes it."""

    item_id: str
    code: str | None = None
    status: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    barcode: str | None = None  # lgcKitIdentifier.numericalCode (LGC-0000-0000-0000)
    alpha_code: str | None = None  # lgcKitIdentifier.alphaCode
    outbound_tracking: str | None = None
    inbound_tracking: str | None = None
    replacement_item_id: str | None = None


@dataclass(frozen=True)
class LgcOrder:
    """GET Order v2, parsed. `fetched_at` is when the answer arrived (our clock)."""

    client_order_id: str
    items: tuple[OrderItem, ...]
    fetched_at: datetime = field(default_factory=lambda: datetime.now(UTC))


def parse_order(data: Any, client_order_id: str, *, fetched_at: datetime | None = None) -> LgcOrder:
    """The documented fields of a GET Order v2 answer; ValueError if it has no order items."""
    items = get_field(data, "orderItems")
    if not isinstance(items, list):
        raise ValueError("the answer has no orderItems list")
    parsed = []
    for raw in items:
        item_id = text_of(get_field(raw, "id"))
        if item_id is None:
            continue  # an item without an id cannot be tracked
        kit = get_field(raw, "lgcKitIdentifier") or {}
        shipment = get_field(raw, "shipment") or {}
        parsed.append(OrderItem(
            item_id=item_id,
            code=text_of(get_field(raw, "code")),
            status=status_code(get_field(raw, "status")),
            created_at=parse_time(get_field(raw, "createdAt")),
            updated_at=parse_time(get_field(raw, "updatedAt")),
            barcode=text_of(get_field(kit, "numericalCode", "barcode"), 50),
            alpha_code=text_of(get_field(kit, "alphaCode"), 20),
            outbound_tracking=text_of(get_field(shipment, "OutboundTrackingNumber")),
            inbound_tracking=text_of(get_field(shipment, "InboundTrackingNumber")),
            replacement_item_id=text_of(get_field(raw, "replacementOrderItemId")),
        ))
    coid = text_of(get_field(data, "clientOrderId")) or client_order_id
    return LgcOrder(coid, tuple(parsed), fetched_at or datetime.now(UTC))


@dataclass(frozen=True)
class CancelAnswer:
    """What LetsGetChecked said to a PATCH cancel. `accepted`: it will process it (202)."""

    accepted: bool
    http_status: int
    reason: str | None = None  # PHI-free: the status and the Problem Details title only


# ---- the API ---------------------------------------------------------------------------------

@dataclass
class LgcApi:
    """The calls after the PUT, sent through `http` (etl.http.make_async_client; one
    connection per worker, as the loader does), which also fetches tokens."""

    lgc: LgcSettings
    retry: RetrySettings
    http: httpx.AsyncClient
    tokens: TokenProvider
    budget: AsyncBudget | None = None  # None: no limit (tests of the API alone)
    requests: int = 0  # HTTP requests sent, retries included

    def __post_init__(self) -> None:
        self._timeout = httpx.Timeout(self.lgc.network.timeout or self.retry.timeout).as_dict()
        if self.tokens.http is None:
            self.tokens.http = self.http

    # -- plumbing --
    async def _send_once(self, method: str, url: str, accept: str, content: bytes | None,
                         extra: Mapping[str, str] | None = None) -> httpx.Response:
        """One attempt; the auth (etl.lgc.auth) adds the token and retries once after a 401."""
        headers = {"User-Agent": USER_AGENT, "Accept": accept, **(extra or {})}
        if content is not None:
            headers["Content-Type"] = "application/json"
        request = httpx.Request(method, url, content=content, headers=headers,
                                extensions={"timeout": self._timeout})
        if self.budget is not None:
            await self.budget.acquire()
        try:
            self.requests += 1
            response = await self.http.send(request, auth=self.tokens, stream=True)
            self.requests += len(response.history)  # the 401 the auth retried after
            return await aread_capped(response, request, self.lgc.max_response_bytes)
        finally:
            if self.budget is not None:
                self.budget.release()

    async def request(self, method: str, url: str, *, accept: str = "application/json",
                      content: bytes | None = None, what: str = "request",
                      headers: Mapping[str, str] | None = None) -> httpx.Response:
        """Send with the shared token (one refresh after a 401) and the shared retry policy.
        Returns any non-retryable answer; raises ApiError when retries run out and AuthError
        when a fresh token is refused too. `what` names the call in messages (no PHI)."""

        async def once() -> httpx.Response:
            response = await self._send_once(method, url, accept, content, headers)
            return raise_for_retryable(response, max_retry_after=self.lgc.max_retry_after)

        try:
            async for attempt in async_retrying(self.retry, max_retry_after=self.lgc.max_retry_after):
                with attempt:
                    response = await once()
        except RetryAfterTooLong as exc:
            raise ApiError(f"LetsGetChecked {what}: HTTP {exc.response.status_code}, asked to wait "
                           f"{exc.asked:.0f}s (Retry-After), more than LGC_MAX_RETRY_AFTER "
                           f"({exc.cap:g}s); asked again next run",
                           status=exc.response.status_code) from None
        except (RetryableStatus, httpx.TransportError) as exc:
            down = unreachable("LetsGetChecked", self.lgc.base_url, "LGC_BASE_URL", exc)
            if down is not None:
                raise down from None
            raise ApiError(f"LetsGetChecked {what}: {describe_transport_error(exc)}",
                           status=exc.response.status_code if isinstance(exc, RetryableStatus) else None) from None
        if response.status_code == 401:
            raise AuthError(f"LetsGetChecked {what}: the credentials were refused (HTTP 401) even "
                            "after a fresh token; check LGC_ACCESS_KEY/LGC_SECRET_KEY or LGC_API_TOKEN",
                            status=401)
        if over_cap(response):
            raise ApiError(f"LetsGetChecked {what}: the answer was larger than "
                           f"LGC_MAX_RESPONSE_BYTES ({self.lgc.max_response_bytes} bytes) and was "
                           "not read", status=response.status_code)
        return response

    def _unexpected(self, response: httpx.Response, what: str) -> ApiError:
        return ApiError(f"LetsGetChecked {what}: unexpected HTTP {response.status_code}",
                        status=response.status_code)

    async def get(self, url: str, *, accept: str = "application/json", what: str,
                  headers: Mapping[str, str] | None = None) -> httpx.Response | None:
        """The one answer rule of the GETs: 200 is the answer, 404 is None (not known or not
        released yet), anything else an ApiError (`request` already handled 401, 429/5xx and
        the size cap)."""
        response = await self.request("GET", url, accept=accept, what=what, headers=headers)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._unexpected(response, what)
        return response

    # -- URLs --
    def results_url(self, barcode: str, *, lab: bool = False) -> str:
        kind = "labresults" if lab else "results"
        return (f"{self.lgc.base_url}/{quote(self.lgc.client_id, safe='')}/api/v1/{kind}/"
                f"{quote(barcode, safe='')}")

    @staticmethod
    def _alpha(alpha_code: str | None, extra: str = "") -> str:
        query = [f"alphaCode={quote(alpha_code, safe='')}"] if alpha_code else []
        if extra:
            query.append(extra)
        return ("?" + "&".join(query)) if query else ""

    # -- calls --
    async def get_order(self, client_order_id: str) -> LgcOrder | None:
        """The order as LetsGetChecked holds it now, or None if it does not know it (404)."""
        response = await self.get(order_url(self.lgc, client_order_id), what="GET order")
        if response is None:
            return None
        try:
            return parse_order(response.json(), client_order_id)
        except ValueError:
            raise ApiError("LetsGetChecked GET order: the answer is not an order (no orderItems)",
                           status=200) from None

    async def cancel_item(self, client_order_id: str, item_id: str, body: Mapping) -> CancelAnswer:
        """PATCH one item to Cancelled. 200/202/204: accepted (processed asynchronously)."""
        url = f"{order_url(self.lgc, client_order_id)}/orderItem/{quote(item_id, safe='')}"
        content = json.dumps(body, separators=(",", ":")).encode()
        response = await self.request("PATCH", url, content=content, what="PATCH cancel")
        status = response.status_code
        if status in (200, 202, 204):
            return CancelAnswer(True, status)
        title = None
        with contextlib.suppress(ValueError):
            data = response.json()
            title = text_of(get_field(data, "title"), 200) if isinstance(data, Mapping) else None
        # only the title: a Problem Details `detail` may echo the patient's data
        return CancelAnswer(False, status, f"HTTP {status}" + (f" {title}" if title else ""))

    async def get_results(self, barcode: str, alpha_code: str | None) -> bytes | None:
        """The results document (JSON bytes as sent), or None while they are not released."""
        url = self.results_url(barcode) + self._alpha(alpha_code)
        response = await self.get(url, what="GET results")
        return None if response is None else response.content

    async def get_lab_results_hl7(self, barcode: str, alpha_code: str | None) -> bytes | None:
        """The HL7 2.3 ORU^R01 message (bytes as sent), or None while it is not released."""
        url = self.results_url(barcode, lab=True) + self._alpha(alpha_code)
        response = await self.get(url, accept=HL7, what="GET lab results")
        return None if response is None else response.content

    async def get_result_status(self, barcode: str, alpha_code: str | None) -> str | None:
        """`fields=status`: Activation completed, SampleCollected, …, ResultsAvailable; None on 404."""
        url = self.results_url(barcode) + self._alpha(alpha_code, "fields=status")
        response = await self.get(url, what="GET result status")
        if response is None:
            return None
        try:
            return text_of(get_field(response.json(), "status"), 40)
        except ValueError:
            return None


class ApiSession:
    """One token, one vendor budget and one token-fetching client for a whole run; `api()` hands
    each concurrent worker its own `LgcApi` with a one-connection keep-alive client from
    etl.http (a shared pool costs O(pool) bookkeeping per request in httpcore; see
    etl.orders.load). With a test's `transport`, every worker shares the one client."""

    def __init__(self, settings: Settings, stack: contextlib.AsyncExitStack, http: httpx.AsyncClient,
                 tokens: TokenProvider, budget: AsyncBudget | None, shared: bool) -> None:
        self.settings, self.lgc = settings, settings.lgc
        self._stack, self.http, self.tokens, self.budget = stack, http, tokens, budget
        self._shared = shared
        self._apis: list[LgcApi] = []

    async def api(self) -> LgcApi:
        http = self.http
        if not self._shared:
            http = await self._stack.enter_async_context(
                make_async_client("", self.settings.retry, self.lgc.network, concurrency=1))
        api = LgcApi(self.lgc, self.settings.retry, http, self.tokens, self.budget)
        self._apis.append(api)
        return api

    @property
    def requests(self) -> int:
        return sum(a.requests for a in self._apis)

    async def for_each(self, things: Iterable[T], handle: Callable[[LgcApi, T], Awaitable[None]],
                       on_error: Callable[[T, ApiError], None]) -> None:
        """`await handle(api, thing)` for every thing, `LgcSettings.concurrency` at a time, each
        worker on its own connection. An ApiError (this thing failed) goes to `on_error` and the
        run goes on; an AuthError (the credentials were refused) stops every worker and is raised."""
        queue: asyncio.Queue[T] = asyncio.Queue()
        for thing in things:
            queue.put_nowait(thing)
        stop: list[ApiError] = []

        async def worker() -> None:
            api = await self.api()
            while not stop:
                try:
                    thing = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    await handle(api, thing)
                except (AuthError, Unreachable) as exc:  # no order can succeed: stop, raise
                    stop.append(exc)
                except ApiError as exc:
                    on_error(thing, exc)

        workers = [asyncio.create_task(worker()) for _ in range(min(self.lgc.concurrency, queue.qsize()))]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        if stop:
            raise stop[0]


@contextlib.asynccontextmanager
async def open_session(settings: Settings, *, engine=None, transport: httpx.AsyncBaseTransport | None = None,
                       owner: str = "lifecycle") -> AsyncIterator[ApiSession]:
    """Validate the LetsGetChecked settings, fetch the token once (bad keys fail here, before
    anything else happens) and yield an `ApiSession`. `transport` replaces the network (tests).
    With the warehouse's `engine` its requests draw on the deployment's vendor budget (shared
    with every loader); without one, the budget is this process's alone."""
    lgc = settings.lgc.validated()
    settings = settings if lgc is settings.lgc else _with_lgc(settings, lgc)
    kw: dict[str, Any] = {"transport": transport} if transport is not None else {}
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(
            make_async_client("", settings.retry, lgc.network, concurrency=1, **kw))
        tokens = TokenProvider(lgc, settings.retry)
        await tokens.token(http)
        budget = await stack.enter_async_context(AsyncBudget(lgc, engine, holder=owner))
        yield ApiSession(settings, stack, http, tokens, budget, shared=transport is not None)


def _with_lgc(settings: Settings, lgc: LgcSettings) -> Settings:
    from dataclasses import replace

    return replace(settings, lgc=lgc)


def get_order(settings: Settings, client_order_id: str, *, engine=None,
              transport: httpx.AsyncBaseTransport | None = None) -> LgcOrder | None:
    """GET one order now: the parsed order, or None when LetsGetChecked does not know it.
    With `engine`, the request draws on the deployment's vendor budget.
    Raises ApiError (vendor unreachable, unexpected answer), AuthError, ConfigError."""

    async def run() -> LgcOrder | None:
        async with open_session(settings, engine=engine, transport=transport) as session:
            return await (await session.api()).get_order(client_order_id)

    return asyncio.run(run())
