"""The receiver's ASGI app (starlette, the stack the sandbox already uses).

`GET /webhooks/rupa/return?row_id=…&sig=…&order=ord_…` is where a practitioner lands after Rupa
Checkout when an intents row's return_url points here: labsync signed the link it gave Rupa
(etl.returnlink: `sig` over the row id); an unsigned or altered link is answered 403 and nothing
is stored. A genuine one stores a small `labsync.checkout_returned` event (the order id, the row
id) and shows a plain page; the apply task links the order to its row if it has none yet.

Each delivery is stored with whether it proved its sender (`authenticated`): a valid signature
(LGC_WEBHOOK_KEY; RUPA_WEBHOOK_SECRET) or Rupa's capability URL (RUPA_WEBHOOK_PATH: Rupa posts to
`/webhooks/rupa/<that secret>`, and the bare `/webhooks/rupa` then answers 404). What an
unauthenticated delivery says is only a hint: the apply tasks may ask the vendor's own API about
what it names, never write what it says.

Every delivery ends in one of: 200 stored (or a repeat of a stored one), 401 bad or missing
signature (nothing stored), 413 too large, 400 not a JSON document (malformed, or nested deeper
than MAX_JSON_DEPTH), 408 the body did not arrive within BODY_TIMEOUT seconds (the connection is
closed), 404 unknown source, 503 the warehouse could not store it (the vendor retries:
LetsGetChecked retries 5xx/401/403 for about an hour, Rupa non-2xx for up to three days). Bodies
are never logged: they carry PHI.

The connections themselves (how many at once, request heads' size and deadline, keep-alive) are
bounded by the server: the app declares etl.asgi.Limits, which `etl.asgi.serve` applies.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import json
import logging
import re
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import accumulate

import sqlalchemy as sa
from sqlalchemy import Engine

from etl.errors import BodyTooLarge

try:  # the labsync[server] extra: a worker without it never imports this module
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route
except ImportError:  # pragma: no cover - tested in the wheel check (scripts/check-wheel.sh)
    from etl.extras import require

    require("server", "the webhook receiver")
    raise

from etl import audit
from etl.asgi import Limits, declare_limits
from etl.errors import ConfigError
from etl.returnlink import link_keys, verify
from etl.settings import WebhookSettings
from etl.webhooks.store import RUPA_CHECKOUT_RETURNED, event_type_of, store_event
from etl.webhooks.verify import HmacVerifier, lgc_verifier, rupa_verifier

log = logging.getLogger(__name__)

# Seconds a delivery's whole body has to arrive in, once its headers have (a slower one is
# answered 408 and its connection closed): 1 MiB at 100 KiB/s. build_app(body_timeout=...).
BODY_TIMEOUT = 10.0
# Levels of arrays and objects a delivery may nest (the vendors' events use fewer than ten);
# deeper is refused 400 before anything else reads it: Python's parser and every later step
# recurse per level.
MAX_JSON_DEPTH = 64


@dataclass(frozen=True)
class Source:
    """One vendor's endpoint: `POST /webhooks/{name}`."""

    name: str
    verifier: HmacVerifier | None  # None: deliveries are not signed (or checking is off)
    type_fields: tuple[str, ...]  # top-level fields naming the event's type, first found wins
    path_secret: str | None = field(default=None, repr=False)  # deliveries come to /webhooks/{name}/{secret}

    def path_ok(self, token: str | None) -> bool | None:
        """None: no capability path for this source (and none given); True: the right one;
        False: a wrong one, or one missing or unexpected."""
        if self.path_secret is None:
            return None if token is None else False
        if token is None:
            return False
        return hmac.compare_digest(token.encode(), self.path_secret.encode())


def default_sources(settings: WebhookSettings) -> dict[str, Source]:
    """LetsGetChecked names the type in `type` (`order`, `Result`, ...); Rupa's field name is
    unpublished: `type`, else `event`, else `event_type`."""
    return {
        "lgc": Source("lgc", lgc_verifier(settings), ("type",)),
        "rupa": Source("rupa", rupa_verifier(settings), ("type", "event", "event_type"),
                       path_secret=settings.rupa_path_secret),
    }


async def _read_capped(request: Request, limit: int, timeout: float) -> bytes:
    """The body, at most `limit` bytes (else BodyTooLarge), within `timeout` seconds (else
    TimeoutError)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    async with asyncio.timeout(timeout):
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes, max_depth: int) -> tuple[object, str | None]:
    """(the document, None), or (None, why it is refused) for a body that is not JSON or is
    nested deeper than `max_depth`. Never raises."""
    if _deeper_than(body, max_depth):
        return None, "the JSON document is nested too deeply"
    try:
        return json.loads(body), None
    except (ValueError, RecursionError):  # not JSON (not UTF-8, a number too long); RecursionError: a guard
        return None, "the body is not a JSON document"


# A JSON string, escapes included, up to its closing quote or, unterminated, to the end of the
# body (so that matching never fails from a quote: one linear pass, whatever the body).
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\(?:.|\Z))*+(?:"|\Z)', re.DOTALL)
_NOT_A_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as signed bytes


def _deeper_than(body: bytes, max_depth: int) -> bool:
    """Whether the arrays and objects of `body` nest deeper than `max_depth`, told from the
    bytes without parsing (strings dropped, then the running count of open brackets), in
    linear time. A body whose brackets do not pair up is not JSON: the parser refuses it."""
    steps = _JSON_STRING.sub(b"", body).translate(_STEPS, _NOT_A_BRACKET)
    return max(accumulate(array("b", steps)), default=0) > max_depth


def _storable(text: str | None) -> str | None:
    """An event type the warehouse can store: no NUL (PostgreSQL text refuses it), no lone
    surrogate (not UTF-8); the body itself is stored as received."""
    if text is None:
        return None
    return text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8") or None


_ORDER_ID = re.compile(r"^ord_[A-Za-z0-9_-]{1,100}$")


def _return_link_keys(engine: Engine, fernet_key: str | None) -> list[bytes]:
    """The keys a checkout return link is signed with (etl.returnlink), from the warehouse's
    Fernet key (LABSYNC_FERNET_KEY as the command read it, else an embedded warehouse's key
    file). ConfigError when there is none."""
    return link_keys(fernet_key, engine)


def _page(title: str, text: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1><p>{text}</p></body></html>")


def build_app(engine: Engine, settings: WebhookSettings,
              sources: Mapping[str, Source] | None = None, *, body_timeout: float | None = None,
              max_json_depth: int | None = None, limits: Limits | None = None,
              fernet_key: str | None = None) -> Starlette:
    """The receiver. `body_timeout` (default BODY_TIMEOUT), `max_json_depth` (default
    MAX_JSON_DEPTH); `limits` (default etl.asgi's) are declared for `etl.asgi.serve`;
    `fernet_key` (LABSYNC_FERNET_KEY) keys the checkout return links' signatures."""
    sources = dict(sources) if sources is not None else default_sources(settings)
    body_timeout = BODY_TIMEOUT if body_timeout is None else body_timeout
    max_json_depth = MAX_JSON_DEPTH if max_json_depth is None else max_json_depth

    async def receive(request: Request) -> JSONResponse:
        source = sources.get(request.path_params["source"])
        by_path = None if source is None else source.path_ok(request.path_params.get("token"))
        if source is None or by_path is False:  # a wrong capability path looks like no endpoint at all
            return JSONResponse({"error": "unknown webhook source"}, status_code=404)
        try:
            body = await _read_capped(request, settings.max_body, body_timeout)
        except BodyTooLarge:
            log.warning("webhooks: a %s delivery over %d bytes was refused", source.name, settings.max_body)
            return JSONResponse({"error": "body too large"}, status_code=413)
        except TimeoutError:
            log.warning("webhooks: a %s delivery whose body did not arrive within %g s was dropped",
                        source.name, body_timeout)
            return JSONResponse({"error": "the body did not arrive in time"}, status_code=408,
                                headers={"Connection": "close"})
        except ClientDisconnect:  # the sender gave up: nobody reads an answer
            log.info("webhooks: a %s delivery was abandoned by its sender before its body ended", source.name)
            return JSONResponse({"error": "the body ended early"}, status_code=400)
        signed = source.verifier is not None and source.verifier(body, request.headers)
        if source.verifier is not None and not signed:
            log.warning("webhooks: a %s delivery with a bad or missing signature was refused", source.name)
            return JSONResponse({"error": "bad or missing signature"}, status_code=401)
        authenticated = bool(signed or by_path)
        document, refused = _parse(body, max_json_depth)
        if refused is not None:
            log.warning("webhooks: a %s delivery was refused: %s", source.name, refused)
            return JSONResponse({"error": refused}, status_code=400)
        event_type = _storable(event_type_of(document, *source.type_fields))
        if (event_type or "").lower().startswith("labsync."):  # labsync's own (the return page's)
            log.warning("webhooks: a %s delivery naming a labsync event type was refused", source.name)
            return JSONResponse({"error": "labsync.* event types are labsync's own"}, status_code=400)
        try:
            event_id, new = await run_in_threadpool(
                store_event, engine, source.name, body, event_type=event_type,
                content_type=request.headers.get("content-type"), authenticated=authenticated)
            # the body may hold PHI: who sent it is recorded (issue 23); no trail, no 200
            await run_in_threadpool(audit.record_receipt, engine,
                                    request.client.host if request.client else None, source.name, event_id)
        except Exception as exc:  # the warehouse is down or full: make the vendor retry
            log.error("webhooks: could not store a %s event (%s); answered 503", source.name,
                      type(exc).__name__)
            return JSONResponse({"error": "could not store the event; retry later"}, status_code=503)
        log.info("webhooks: %s event %d (%s)%s%s", source.name, event_id, event_type or "no type",
                 "" if authenticated else ", unauthenticated (a hint only)",
                 "" if new else ", a repeated delivery")
        return JSONResponse({"ok": True, "duplicate": not new})

    async def rupa_return(request: Request) -> HTMLResponse:
        q = request.query_params
        order, row_id, sig = q.get("order", ""), q.get("row_id", ""), q.get("sig", "")
        if not _ORDER_ID.match(order) or not 0 < len(row_id) <= 100:
            return HTMLResponse(_page("This link is incomplete", "It names no Rupa order or no row."), 400)
        try:  # the link must be one labsync made for this row (the order is Rupa's to add)
            keys = await run_in_threadpool(_return_link_keys, engine, fernet_key)
        except ConfigError:
            log.error("webhooks: a checkout return cannot be checked: no Fernet key for this warehouse")
            return HTMLResponse(_page("Not recorded yet", "Please reload this page in a minute."), 503)
        if not verify(keys, row_id, sig):
            log.warning("webhooks: a checkout return with a bad or missing signature was refused")
            return HTMLResponse(_page("This link is not valid", "It was not made by labsync for this order; "
                                      "nothing was recorded."), 403)
        body = json.dumps({"type": RUPA_CHECKOUT_RETURNED, "order": order, "row_id": row_id,
                           "signed": True}).encode()
        try:
            await run_in_threadpool(store_event, engine, "rupa", body, event_type=RUPA_CHECKOUT_RETURNED,
                                    content_type="application/json", authenticated=True)
        except Exception as exc:
            log.error("webhooks: could not store a checkout return (%s)", type(exc).__name__)
            return HTMLResponse(_page("Not recorded yet", "Please reload this page in a minute."), 503)
        log.info("webhooks: checkout return for order %s", order)
        return HTMLResponse(_page("Order submitted", f"Rupa order <code id='order'>{html.escape(order)}</code> "
                                  "is recorded. You can close this tab."))

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def readyz(request: Request) -> JSONResponse:
        def ping() -> None:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))

        try:
            await run_in_threadpool(ping)
        except Exception as exc:
            return JSONResponse({"ok": False, "warehouse": type(exc).__name__}, status_code=503)
        return JSONResponse({"ok": True})

    app = Starlette(routes=[
        Route("/webhooks/rupa/return", rupa_return, methods=["GET"]),
        Route("/webhooks/{source}", receive, methods=["POST"]),
        Route("/webhooks/{source}/{token}", receive, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ])
    declare_limits(app, limits if limits is not None else Limits())
    return app
