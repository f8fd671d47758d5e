"""The receiver's ASGI app (starlette, the stack the sandbox already uses).

Every delivery ends in one of: 200 stored (or a repeat of a stored one), 401 bad or missing
signature (nothing stored), 413 too large, 400 not a JSON document, 404 unknown source, 503 the
warehouse could not store it (the vendor retries: LetsGetChecked retries 5xx/401/403 for about
an hour, Rupa non-2xx for up to three days). Bodies are never logged: they carry PHI.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from etl.settings import WebhookSettings
from etl.webhooks.store import event_type_of, store_event
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


class _TooLarge(Exception):
    pass


async def _read_capped(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(engine: Engine, settings: WebhookSettings,
              sources: Mapping[str, Source] | None = None) -> Starlette:
    sources = dict(sources) if sources is not None else default_sources(settings)

    async def receive(request: Request) -> JSONResponse:
        source = sources.get(request.path_params["source"])
        if source is None:
            return JSONResponse({"error": "unknown webhook source"}, status_code=404)
        try:
            body = await _read_capped(request, settings.max_body)
        except _TooLarge:
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
        Route("/webhooks/{source}", receive, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ])
