"""Load validated rows into LetsGetChecked: one idempotent PUT per row, every outcome in the ledger.

    load_rows(engine, settings, rows, batch_id=None, progress=None) -> LoadSummary

is what the CLI and the Airflow DAG call (`aload_rows` is the same thing for callers that are
already async). Rows are any iterable of validated row dicts (see etl.batches.validate); they
are consumed window by window, so memory stays flat however large the batch is.

Pipeline: read a window of rows -> map each to its PUT body (etl.lgc.payload) -> `ledger.claim`
(pending rows written *before* sending; decides send/skip/busy) -> a bounded queue -> N workers
(`LgcSettings.concurrency`) sharing one httpx.AsyncClient, one token and one rate limiter
(`LgcSettings.rate_limit` orders/s) -> outcomes buffered and written by `ledger.record` in
batches, off the event loop. A crash between a PUT and its record leaves the row `pending`; the
next run sends it again, which the API's idempotency makes safe.

Concurrent runs on the same ledger (parallel DAG tasks, a second CLI run) are safe: a row is
sent only by the run holding its claim; a row held by another live run is counted `busy` and
left to that run (see etl.lgc.ledger). A clientOrderId that occurs twice in one run while its
first row is still in flight is counted `duplicate` and not sent.

A 401 that survives a token refresh stops the batch: rows already claimed but not yet sent are
marked `failed` (the next run sends them) and no further rows are read.

Every request waits for the vendor budget shared by all loaders through the warehouse
(etl.lgc.budget). The load's breaker (etl.lgc.breaker) stops it after LGC_BREAKER_FAILURES
failed attempts in a row or at LGC_LOAD_DEADLINE: nothing new is sent, and every row left,
read or not, is recorded `failed` with that reason so the next run sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import islice
from typing import Any

import httpx
from sqlalchemy import Engine

from etl.errors import AuthError, LabsyncError
from etl.http import make_async_client
from etl.lgc import ledger
from etl.lgc.auth import TokenProvider
from etl.lgc.breaker import Breaker
from etl.lgc.budget import AsyncBudget
from etl.lgc.client import ACCEPTED, CONFLICT, FAILED, REJECTED, LgcClient, Outcome
from etl.lgc.ledger import BUSY, SEND, Prepared
from etl.lgc.payload import PayloadError, build_payload, client_order_id, payload_sha256
from etl.settings import Settings

log = logging.getLogger(__name__)

BUSY_STATE, DUPLICATE = "busy", "duplicate"
OK_STATES = frozenset({ACCEPTED, CONFLICT})
STOPPED_ERROR = "not sent: the batch stopped after LetsGetChecked refused the credentials"


@dataclass(frozen=True)
class RowResult:
    """Handed to `progress` once per row: PHI-free."""

    client_order_id: str | None
    line: int | None
    state: str  # accepted rejected conflict failed busy duplicate
    sent: bool


@dataclass
class LoadSummary:
    """What one load did. `counts` has one entry per row read, by final state."""

    counts: Counter = field(default_factory=Counter)
    sent: int = 0  # rows this run PUT (whatever the answer)
    skipped: int = 0  # rows not sent because the ledger already had their outcome
    requests: int = 0  # HTTP PUTs made, retries included
    token_fetches: int = 0
    stopped: str | None = None  # why the batch stopped early, if it did
    credentials_refused: bool = False  # the stop was a 401 / refused keys
    elapsed: float = 0.0

    @property
    def rows(self) -> int:
        return sum(self.counts.values())

    @property
    def exit_code(self) -> int:
        """0 all rows accepted or conflict; 1 some rows rejected/failed/busy/duplicate;
        2 the credentials were refused (a configuration problem)."""
        if self.credentials_refused:
            return 2
        if self.stopped:
            return 1
        return 0 if all(s in OK_STATES for s in self.counts) else 1

    def merge(self, other: LoadSummary) -> LoadSummary:
        """Add up summaries (e.g. of the chunks a DAG loaded in parallel)."""
        return LoadSummary(
            counts=self.counts + other.counts,
            sent=self.sent + other.sent,
            skipped=self.skipped + other.skipped,
            requests=self.requests + other.requests,
            token_fetches=self.token_fetches + other.token_fetches,
            stopped=self.stopped or other.stopped,
            credentials_refused=self.credentials_refused or other.credentials_refused,
            elapsed=self.elapsed + other.elapsed,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts), "rows": self.rows, "sent": self.sent,
            "skipped": self.skipped, "requests": self.requests,
            "token_fetches": self.token_fetches, "stopped": self.stopped,
            "elapsed": round(self.elapsed, 3), "exit_code": self.exit_code,
        }


def body_bytes(body: Mapping[str, Any]) -> bytes:
    """The exact bytes sent (document key order, compact, UTF-8)."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def prepare(row: Mapping[str, Any]) -> Prepared:
    """Row -> Prepared. Raises PayloadError only when the row has no client_order_id."""
    coid = client_order_id(row)
    line = row.get("line")
    try:
        body = build_payload(row)
    except PayloadError as exc:
        reason = f"row cannot be mapped to an order: {exc}"
        return Prepared(coid, line, None, b"", payload_sha256({"unmappable": reason}), reason)
    return Prepared(coid, line, body, body_bytes(body), payload_sha256(body))


def _windows(rows: Iterable[Mapping[str, Any]], size: int) -> Iterator[list[Mapping[str, Any]]]:
    it = iter(rows)
    while window := list(islice(it, size)):
        yield window


class _Writer:
    """Buffers outcomes and writes them with `ledger.record` in batches, in a worker thread, so
    the event loop keeps sending while the warehouse commits."""

    def __init__(self, engine: Engine, run: str, inflight: set[str], *, interval: float = 0.2,
                 max_batch: int = 500) -> None:
        self.engine, self.run, self.inflight = engine, run, inflight
        self.interval, self.max_batch = interval, max_batch
        self._buf: list[tuple[str, Outcome]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._task = asyncio.create_task(self._loop())

    def add(self, coid: str, outcome: Outcome) -> None:
        if self._task.done():
            self._task.result()  # re-raise the warehouse error that stopped the writer
        self._buf.append((coid, outcome))
        if len(self._buf) >= self.max_batch:
            self._wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            batch, self._buf = self._buf, []
            if batch:
                await asyncio.to_thread(ledger.record, self.engine, batch, run=self.run)
                for coid, _ in batch:
                    self.inflight.discard(coid)
            if self._closing and not self._buf:
                return

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        await self._task


def load_rows(
    engine: Engine,
    settings: Settings,
    rows: Iterable[Mapping[str, Any]],
    *,
    batch_id: int | None = None,
    progress: Callable[[RowResult], None] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    lease: timedelta = ledger.DEFAULT_LEASE,
) -> LoadSummary:
    """Send every row (that the ledger does not already settle) and record each outcome.
    Raises ConfigError for bad settings and AuthError if the token endpoint refuses the keys
    (before any row is touched). Safe to run concurrently in several processes."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(
            aload_rows(engine, settings, rows, batch_id=batch_id, progress=progress,
                       transport=transport, lease=lease)
        )


def _loop_factory():
    """uvloop when available (it comes with uvicorn): the HTTP stack's per-request overhead is
    mostly event-loop work, and uvloop roughly halves it. The standard loop otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return None
    return uvloop.new_event_loop


async def aload_rows(
    engine: Engine,
    settings: Settings,
    rows: Iterable[Mapping[str, Any]],
    *,
    batch_id: int | None = None,
    progress: Callable[[RowResult], None] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    lease: timedelta = ledger.DEFAULT_LEASE,
) -> LoadSummary:
    lgc = settings.lgc.validated()
    started = time.monotonic()
    run = ledger.new_run_id()
    summary = LoadSummary()
    inflight: set[str] = set()  # claimed by this run and not yet recorded
    stop = asyncio.Event()
    unsent: list[str] = []  # claimed, then not sent because the batch stopped
    window_size = max(50, min(1000, lgc.concurrency * 4))
    # room for a whole window beyond the one being sent: the next claim overlaps the sending
    queue: asyncio.Queue[Prepared | None] = asyncio.Queue(maxsize=window_size + lgc.concurrency)

    def report(coid: str | None, line: int | None, state: str, *, sent: bool) -> None:
        summary.counts[state] += 1
        if progress is not None:
            progress(RowResult(coid, line, state, sent))

    kw: dict[str, Any] = {"transport": transport} if transport is not None else {}
    async with contextlib.AsyncExitStack() as stack:
        # One keep-alive connection per worker, each its own one-connection transport: a single
        # pool of N connections costs O(N) bookkeeping per request in httpcore, which caps
        # throughput long before the network does. Token, rate limit and ledger stay shared.
        ssl_context = httpx.create_ssl_context()  # load the CA bundle once, not per worker
        http = await stack.enter_async_context(
            make_async_client("", settings.retry, concurrency=1, verify=ssl_context, **kw)
        )
        tokens = TokenProvider(lgc, settings.retry)
        await tokens.token(http)  # bad keys fail here, before any row is claimed
        budget = await stack.enter_async_context(AsyncBudget(lgc, engine, holder=run))
        tripped: list[str] = []  # the breaker stopped the batch: drain the rest as failed

        def on_trip(cause: str) -> None:
            if not stop.is_set():
                tripped.append(breaker.reason)
                summary.stopped = cause
                stop.set()
            log.error("batch %s stopped: %s", batch_id, cause)

        breaker = Breaker.for_load(lgc, on_trip=on_trip).start()
        stack.callback(breaker.close)
        writer = _Writer(engine, run, inflight)

        async def new_transport() -> httpx.AsyncBaseTransport:
            if transport is not None:  # a test's transport: shared, closed with `http`
                return transport
            one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            return await stack.enter_async_context(
                httpx.AsyncHTTPTransport(verify=ssl_context, limits=one)
            )

        crashed: list[BaseException] = []

        async def worker() -> None:
            """Send until the sentinel. A bug here must not leave the producer blocked on a
            full queue: stop the batch, keep draining (those rows go back as `failed`), and let
            the error surface after the clean-up."""
            try:
                await send_all()
            except Exception as exc:
                crashed.append(exc)
                stop.set()
                while (item := await queue.get()) is not None:
                    unsent.append(item.client_order_id)

        async def send_all() -> None:
            client = LgcClient(lgc, settings.retry, http, tokens, budget, await new_transport(), breaker)
            while (item := await queue.get()) is not None:
                if stop.is_set():
                    unsent.append(item.client_order_id)
                    continue
                if item.body is None:
                    outcome = Outcome(REJECTED, None, attempts=0, error=item.error)
                else:
                    try:
                        outcome = await client.put_order(item.client_order_id, item.body, item.content)
                    except LabsyncError as exc:  # the token endpoint failed during a refresh
                        outcome = Outcome(FAILED, None, attempts=1, error=str(exc), stop=True)
                        summary.credentials_refused |= isinstance(exc, AuthError)
                    summary.sent += 1
                    summary.requests += outcome.attempts
                    summary.credentials_refused |= outcome.stop and outcome.http_status == 401
                writer.add(item.client_order_id, outcome)
                _log_outcome(item, outcome, batch_id)
                report(item.client_order_id, item.line, outcome.state, sent=item.body is not None)
                if outcome.stop and not stop.is_set():
                    summary.stopped = outcome.error
                    stop.set()
                    log.error("batch %s stopped: %s", batch_id, outcome.error)

        workers = [asyncio.create_task(worker()) for _ in range(lgc.concurrency)]
        windows = _windows(rows, window_size)
        try:
            while not stop.is_set() or tripped:
                window = await asyncio.to_thread(next, windows, None)
                if window is None:
                    break
                items = _prepare_window(window, inflight, batch_id, report)
                decisions = await asyncio.to_thread(
                    ledger.claim, engine, items, run=run, batch_id=batch_id, lease=lease
                )
                for d in decisions:
                    coid = d.item.client_order_id
                    if d.action == SEND:
                        if stop.is_set():
                            unsent.append(coid)
                        else:
                            await queue.put(d.item)
                        continue
                    inflight.discard(coid)
                    if d.action == BUSY:
                        log.warning("order %s (batch %s, line %s): %s; not sent",
                                    coid, batch_id, d.item.line, d.note)
                        report(coid, d.item.line, BUSY_STATE, sent=False)
                    else:
                        summary.skipped += 1
                        log.debug("order %s (batch %s, line %s): %s", coid, batch_id, d.item.line, d.note)
                        report(coid, d.item.line, d.state or CONFLICT, sent=False)
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)
            if crashed:
                raise crashed[0]
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            while not queue.empty():
                item = queue.get_nowait()
                if item is not None:
                    unsent.append(item.client_order_id)
            await writer.close()
            if unsent:
                # failed + claim released, so the next run (or a concurrent one) sends them
                error = tripped[0] if tripped else STOPPED_ERROR
                await asyncio.to_thread(ledger.release, engine, unsent, run=run, error=error)
                for coid in unsent:
                    inflight.discard(coid)
                    report(coid, None, FAILED, sent=False)
            if inflight:  # cancelled mid-request (an error above): outcome unknown, stays pending
                await asyncio.to_thread(ledger.unclaim, engine, list(inflight), run=run)
        summary.token_fetches = tokens.fetches
    summary.elapsed = time.monotonic() - started
    log.info("batch %s loaded: %s", batch_id, ", ".join(f"{k} {v}" for k, v in sorted(summary.counts.items())))
    return summary


def _prepare_window(window, inflight: set[str], batch_id, report) -> list[Prepared]:
    items: list[Prepared] = []
    for row in window:
        line = row.get("line")
        try:
            item = prepare(row)
        except PayloadError:
            log.warning("batch %s line %s: no client_order_id; not sent", batch_id, line)
            report(None, line, REJECTED, sent=False)
            continue
        if item.client_order_id in inflight:
            log.warning("order %s (batch %s, line %s): repeats a row still in flight; not sent",
                        item.client_order_id, batch_id, line)
            report(item.client_order_id, line, DUPLICATE, sent=False)
            continue
        inflight.add(item.client_order_id)
        items.append(item)
    return items


def _log_outcome(item: Prepared, outcome: Outcome, batch_id: int | None) -> None:
    """PHI-free: clientOrderId, batch, line, state, HTTP status; never the vendor's text."""
    if outcome.state == FAILED:
        log.warning("order %s (batch %s, line %s): failed: %s",
                    item.client_order_id, batch_id, item.line, outcome.error)
    elif outcome.state == REJECTED:
        log.info("order %s (batch %s, line %s): rejected (HTTP %s); see `labsync status %s`",
                 item.client_order_id, batch_id, item.line, outcome.http_status, item.client_order_id)
    else:
        log.debug("order %s (batch %s, line %s): %s (HTTP %s, %d attempts)",
                  item.client_order_id, batch_id, item.line, outcome.state, outcome.http_status,
                  outcome.attempts)
