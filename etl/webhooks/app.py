"""The receiver's ASGI app (starlette, the stack the sandbox already uses).

`GET /webhooks/rupa/return?row_id=…&order=ord_…` is where a practitioner lands after Rupa
Checkout when an intents row's return_url points here: it stores a small
`labsync.checkout_returned` event (the order id, the row id) and shows a plain page; the apply
task links the order to its row.

Every delivery ends in one of: 200 stored (or a repeat of a stored one), 401 bad or missing
signature (nothing stored), 413 too large, 400 not a JSON document, 404 unknown source, 503 the
warehouse could not store it (the vendor retries: LetsGetChecked retries 5xx/401/403 for about
an hour, Rupa non-2xx for up to three days). Bodies are never logged: they carry PHI.
"""

from __future__ import annotations

import html
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import Engine

from etl.errors import BodyTooLarge

try:  # the labsync[server] extra: a worker without it never imports this module
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route
except ImportError:  # pragma: no cover - tested in the wheel check (scripts/check-wheel.sh)
    from etl.extras import require

    require("server", "the webhook receiver")
    raise

from etl.settings import WebhookSettings
from etl.webhooks.store import RUPA_CHECKOUT_RETURNED, event_type_of, store_event
from etl.webhooks.verify import HmacVerifier, lgc_verifier, rupa_verifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """One vendor's endpoint: `POST /webhooks/{name}`."""

    name: str
    verifier: HmacVerifier | None  # None: deliveries are not signed (or checking is off)
    type_fields: tuple[str, ...]  # top-level fields naming the event's type, first found wins


def default_sources(settings: WebhookSettings) -> dict[str, Source]:
    """LetsGetChecked names the type in `type` (`order`, `Result`, ...); Rupa's field name is
    unpublished: `type`, else `event`, else `event_type`."""
    return {
        "lgc": Source("lgc", lgc_verifier(settings), ("type",)),
        "rupa": Source("rupa", rupa_verifier(settings), ("type", "event", "event_type")),
    }


async def _read_capped(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


_ORDER_ID = re.compile(r"^ord_[A-Za-z0-9_-]{1,100}$")


def _page(title: str, text: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1><p>{text}</p></body></html>")


def build_app(engine: Engine, settings: WebhookSettings,
              sources: Mapping[str, Source] | None = None) -> Starlette:
    sources = dict(sources) if sources is not None else default_sources(settings)

    async def receive(request: Request) -> JSONResponse:
        source = sources.get(request.path_params["source"])
        if source is None:
            return JSONResponse({"error": "unknown webhook source"}, status_code=404)
        try:
            body = await _read_capped(request, settings.max_body)
        except BodyTooLarge:
            log.warning("webhooks: a %s delivery over %d bytes was refused", source.name, settings.max_body)
            return JSONResponse({"error": "body too large"}, status_code=413)
        if source.verifier is not None and not source.verifier(body, request.headers):
            log.warning("webhooks: a %s delivery with a bad or missing signature was refused", source.name)
            return JSONResponse({"error": "bad or missing signature"}, status_code=401)
        try:
            document = json.loads(body)
        except ValueError:
            log.warning("webhooks: a %s delivery that is not JSON was refused", source.name)
            return JSONResponse({"error": "the body is not a JSON document"}, status_code=400)
        event_type = event_type_of(document, *source.type_fields)
        try:
            event_id, new = await run_in_threadpool(
                store_event, engine, source.name, body, event_type=event_type,
                content_type=request.headers.get("content-type"))
        except Exception as exc:  # the warehouse is down or full: make the vendor retry
            log.error("webhooks: could not store a %s event (%s); answered 503", source.name,
                      type(exc).__name__)
            return JSONResponse({"error": "could not store the event; retry later"}, status_code=503)
        log.info("webhooks: %s event %d (%s)%s", source.name, event_id, event_type or "no type",
                 "" if new else ", a repeated delivery")
        return JSONResponse({"ok": True, "duplicate": not new})

    async def rupa_return(request: Request) -> HTMLResponse:
        order, row_id = request.query_params.get("order", ""), request.query_params.get("row_id", "")
        if not _ORDER_ID.match(order) or not 0 < len(row_id) <= 100:
            return HTMLResponse(_page("This link is incomplete", "It names no Rupa order or no row."), 400)
        body = json.dumps({"type": RUPA_CHECKOUT_RETURNED, "order": order, "row_id": row_id}).encode()
        try:
            await run_in_threadpool(store_event, engine, "rupa", body, event_type=RUPA_CHECKOUT_RETURNED,
                                    content_type="application/json")
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

    return Starlette(routes=[
        Route("/webhooks/rupa/return", rupa_return, methods=["GET"]),
        Route("/webhooks/{source}", receive, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ])
