"""Load outbox rows into LetsGetChecked: one idempotent PUT per row, every outcome recorded.

    load_chunk(engine, settings, chunk, owner=...) -> LoadSummary     # what the DAG's load tasks,
                                                                     # the CLI and `retry` call
    load_rows(engine, settings, rows, ...) -> LoadSummary            # rows -> outbox -> load (tests, bench)

A chunk is an id range of one batch's outbox rows (etl.orders.outbox.Chunk). Pipeline: read a window
of rows (their stored bodies) -> `ledger.claim` (pending written *before* sending; decides
send / skip / busy; the outbox follows in the same transaction) -> a bounded queue -> N workers
(`LgcSettings.concurrency`) sharing one httpx.AsyncClient, one token and the vendor budget ->
outcomes buffered and written by `ledger.record` in batches, off the event loop. The next
window is read and claimed while the current one is being sent.

Claims are owned by `owner` (etl.claims: the Airflow task instance, or `cli:<uuid>`) and kept
alive by a heartbeat thread while the load runs. A crash between a PUT and its record leaves
the row `pending` under a claim that lapses; the next run sends it again, which the API's
idempotency makes safe. Rows held by another live owner are `busy` and left to it.

When the batch stops early, the rows claimed but not sent are released as `failed` with the
true reason: LetsGetChecked refused the credentials (a 401 that survives a token refresh), the
run was interrupted (Ctrl-C, a cancelled task), or the loader hit an error. Rows whose request
was cut off mid-way keep `pending` (their outcome is unknown), lose the claim at once, and say
why in `last_error`; a later run sends them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import Engine

from etl.claims import Heartbeat, cli_owner
from etl.errors import AuthError, LabsyncError
from etl.http import make_async_client
from etl.lgc.auth import TokenProvider
from etl.lgc.breaker import Breaker
from etl.lgc.budget import AsyncBudget
from etl.lgc.client import ACCEPTED, CONFLICT, FAILED, LgcClient, Outcome
from etl.orders import ledger, outbox
from etl.orders.ledger import BUSY, SEND, Prepared, Result
from etl.orders.outbox import Chunk, body_bytes  # noqa: F401  (body_bytes re-exported)
from etl.settings import Settings
from etl.states import OutboxState
from etl.vault import vault_for

log = logging.getLogger(__name__)

BUSY_STATE, DUPLICATE = "busy", "duplicate"
OK_STATES = frozenset({ACCEPTED, CONFLICT, OutboxState.ALREADY_SETTLED})
STOPPED_ERROR = "not sent: the batch stopped after LetsGetChecked refused the credentials"
INTERRUPTED_ERROR = "not sent: the load was interrupted; it goes out on the next run"
INTERRUPTED_INFLIGHT = "interrupted while being sent; outcome unknown; sent again on the next run"
CRASHED_ERROR = "not sent: the load stopped on an unexpected error; it goes out on the next run"


@dataclass(frozen=True)
class RowResult:
    """Handed to `progress` once per row: PHI-free."""

    client_order_id: str | None
    line: int | None
    state: str  # accepted rejected conflict failed given_up already_settled busy duplicate
    sent: bool


@dataclass
class LoadSummary:
    """What one load did. `counts` has one entry per row it handled, by outcome."""

    counts: Counter = field(default_factory=Counter)
    sent: int = 0  # rows this run PUT (whatever the answer)
    skipped: int = 0  # rows not sent because the ledger already had their outcome
    requests: int = 0  # HTTP PUTs made, retries included
    token_fetches: int = 0
    stopped: str | None = None  # why the batch stopped early, if it did
    credentials_refused: bool = False  # the stop was a 401 / refused keys
    interrupted: bool = False
    elapsed: float = 0.0

    @property
    def rows(self) -> int:
        return sum(self.counts.values())

    @property
    def exit_code(self) -> int:
        """0 all rows accepted, conflict or already settled; 1 some rows rejected / failed /
        busy; 2 the credentials were refused (a configuration problem)."""
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
            interrupted=self.interrupted or other.interrupted,
            elapsed=self.elapsed + other.elapsed,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts), "rows": self.rows, "sent": self.sent,
            "skipped": self.skipped, "requests": self.requests,
            "token_fetches": self.token_fetches, "stopped": self.stopped,
            "elapsed": round(self.elapsed, 3), "exit_code": self.exit_code,
        }


class _Writer:
    """Buffers outcomes and writes them with `ledger.record` in batches, in the loader's
    database thread, so the event loop keeps sending while the warehouse commits."""

    def __init__(self, db: Callable, engine: Engine, owner: str, max_attempts: int, inflight: set[int],
                 *, interval: float = 0.2, max_batch: int = 500) -> None:
        self.db, self.engine, self.owner, self.max_attempts = db, engine, owner, max_attempts
        self.inflight = inflight
        self.interval, self.max_batch = interval, max_batch
        self._buf: list[Result] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._task = asyncio.create_task(self._loop())

    def add(self, result: Result) -> None:
        if self._task.done():
            self._task.result()  # re-raise the warehouse error that stopped the writer
        self._buf.append(result)
        if len(self._buf) >= self.max_batch:
            self._wake.set()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            batch, self._buf = self._buf, []
            if batch:
                await self.db(ledger.record, self.engine, batch, owner=self.owner, max_attempts=self.max_attempts)
                for r in batch:
                    self.inflight.discard(r.item.outbox_id)
            if self._closing and not self._buf:
                return

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        await self._task


def _loop_factory():
    """uvloop when available (it comes with uvicorn): the HTTP stack's per-request overhead is
    mostly event-loop work, and uvloop roughly halves it. The standard loop otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return None
    return uvloop.new_event_loop


def load_chunk(
    engine: Engine,
    settings: Settings,
    chunk: Chunk | Mapping[str, Any],
    *,
    owner: str,
    heartbeat_owners: Iterable[str] = (),
    progress: Callable[[RowResult], None] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> LoadSummary:
    """Send the loadable rows of one chunk and record each outcome. Raises ConfigError for bad
    settings and AuthError if the token endpoint refuses the keys (before any row is claimed).
    Safe to run concurrently in several processes and to re-run (a retried task instance)."""
    chunk = chunk if isinstance(chunk, Chunk) else Chunk.of(chunk)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(
            aload_chunk(engine, settings, chunk, owner=owner, heartbeat_owners=heartbeat_owners,
                        progress=progress, transport=transport)
        )


async def aload_chunk(
    engine: Engine,
    settings: Settings,
    chunk: Chunk,
    *,
    owner: str,
    heartbeat_owners: Iterable[str] = (),
    progress: Callable[[RowResult], None] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> LoadSummary:
    lgc = settings.lgc.validated()
    lease = timedelta(seconds=settings.lease_seconds)
    max_attempts = settings.max_attempts
    started = time.monotonic()
    summary = LoadSummary()
    batch_id = chunk.batch_id
    inflight: set[int] = set()  # outbox ids claimed by this load and not recorded yet
    stop = asyncio.Event()
    stop_reason: list[str] = []
    unsent: list[Prepared] = []  # claimed, then not sent because the batch stopped
    window_size = max(50, min(1000, lgc.concurrency * 4))
    # room for a whole window beyond the one being sent: the next claim overlaps the sending
    queue: asyncio.Queue[Prepared | None] = asyncio.Queue(maxsize=window_size + lgc.concurrency)
    # one thread for the warehouse: claims, reads and records never run two at once, and an
    # interruption can wait for the statement in flight before cleaning up after it
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labsync-db")
    loop = asyncio.get_running_loop()

    async def db(fn, *args, **kw):
        return await loop.run_in_executor(executor, lambda: fn(*args, **kw))

    def report(coid: str | None, line: int | None, state: str, *, sent: bool) -> None:
        summary.counts[state] += 1
        if progress is not None:
            progress(RowResult(coid, line, state, sent))

    def halt(reason: str, why: str | None = None) -> None:
        """Stop the batch: `reason` is recorded on every row claimed and not sent, `why` is what
        the summary (and the CLI) say stopped it."""
        if not stop.is_set():
            stop_reason.append(reason)
            summary.stopped = summary.stopped or why or reason
            stop.set()

    kw: dict[str, Any] = {"transport": transport} if transport is not None else {}
    heartbeat = Heartbeat(engine, [owner, *heartbeat_owners], lease=lease,
                          interval=settings.heartbeat_seconds).start()
    failure: BaseException | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            # One keep-alive connection per worker, each its own one-connection client (etl.http:
            # httpx's transport, the connection's proxy, CA bundle and client certificate): a
            # single pool of N connections costs O(N) bookkeeping per request in httpcore, which
            # caps throughput long before the network does. Token, rate limit and ledger are shared.
            http = await stack.enter_async_context(
                make_async_client("", settings.retry, lgc.network, concurrency=1, **kw)
            )
            tokens = TokenProvider(lgc, settings.retry)
            await tokens.token(http)  # bad keys fail here, before any row is claimed
            # the vendor budget shared by every loader of the deployment (etl.lgc.budget) and
            # this load's breaker: N failed attempts in a row, or the deadline, stop the batch
            budget = await stack.enter_async_context(AsyncBudget(lgc, engine, holder=owner))

            def on_trip(cause: str) -> None:
                halt(breaker.reason or cause, cause)
                log.error("batch %s stopped: %s", batch_id, cause)

            breaker = Breaker.for_load(lgc, on_trip=on_trip).start()
            stack.callback(breaker.close)
            writer = _Writer(db, engine, owner, max_attempts, inflight)

            async def worker_client() -> httpx.AsyncClient:
                if transport is not None:  # a test's transport: shared, closed with `http`
                    return http
                return await stack.enter_async_context(
                    make_async_client("", settings.retry, lgc.network, concurrency=1))

            crashed: list[BaseException] = []

            async def worker() -> None:
                """Send until the sentinel. A bug here must not leave the producer blocked on
                a full queue: stop the batch, keep draining (those rows go back as `failed`),
                and let the error surface after the clean-up."""
                try:
                    await send_all()
                except Exception as exc:
                    crashed.append(exc)
                    halt(CRASHED_ERROR)
                    while (item := await queue.get()) is not None:
                        unsent.append(item)

            async def send_all() -> None:
                client = LgcClient(lgc, settings.retry, await worker_client(), tokens, budget, breaker)
                while (item := await queue.get()) is not None:
                    if stop.is_set():
                        unsent.append(item)
                        continue
                    try:
                        outcome = await client.put_order(item.client_order_id, item.body, item.content)
                    except LabsyncError as exc:  # the token endpoint failed during a refresh
                        outcome = Outcome(FAILED, None, attempts=1, error=str(exc), stop=True)
                        summary.credentials_refused |= isinstance(exc, AuthError)
                    summary.sent += 1
                    summary.requests += outcome.attempts
                    summary.credentials_refused |= outcome.stop and outcome.http_status == 401
                    tries = item.attempts + 1
                    state = ledger.outbox_outcome(outcome.state, tries, max_attempts)
                    writer.add(Result(item, outcome, True))
                    _log_outcome(item, outcome, state)
                    report(item.client_order_id, item.line, state, sent=True)
                    if outcome.stop and not stop.is_set():
                        refused = outcome.http_status == 401 or summary.credentials_refused
                        halt(STOPPED_ERROR if refused else f"not sent: the batch stopped ({outcome.error}); "
                             "it goes out on the next run", outcome.error or "stopped")
                        log.error("batch %s stopped: %s", batch_id, outcome.error)

            workers = [asyncio.create_task(worker()) for _ in range(lgc.concurrency)]
            # the first window is one row a worker: every worker has a row to send sooner (at
            # concurrency 100 a full window took ~60 ms to read, unseal and claim before any PUT)
            windows = outbox.pages(engine, chunk, size=window_size, max_attempts=max_attempts,
                                   vault=vault_for(settings.fernet_key, engine), first=lgc.concurrency)
            try:
                while not stop.is_set():
                    window = await db(next, windows, None)
                    if window is None:
                        break
                    inflight.update(i.outbox_id for i in window)
                    decisions = await db(ledger.claim, engine, window, owner=owner, lease=lease)
                    for d in decisions:
                        item = d.item
                        if d.action == SEND:
                            if stop.is_set():
                                unsent.append(item)
                            else:
                                await queue.put(item)
                            continue
                        inflight.discard(item.outbox_id)
                        if d.action == BUSY:
                            log.warning("order %s (batch %s, line %s): %s; not sent",
                                        item.client_order_id, batch_id, item.line, d.note)
                            report(item.client_order_id, item.line, BUSY_STATE, sent=False)
                        else:
                            summary.skipped += 1
                            log.debug("order %s (batch %s, line %s): %s", item.client_order_id,
                                      batch_id, item.line, d.note or d.state)
                            report(item.client_order_id, item.line, d.state, sent=False)
                for _ in workers:
                    await queue.put(None)
                await asyncio.gather(*workers)
                if crashed:
                    raise crashed[0]
                if stop_reason:  # stopped cleanly: the rows not read yet get the same true reason
                    left = await db(outbox.fail_rest, engine, chunk, stop_reason[0], max_attempts=max_attempts)
                    for _ in range(left):
                        report(None, None, FAILED, sent=False)
            except BaseException as exc:
                failure = exc
                if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
                    summary.interrupted = True
                    halt(INTERRUPTED_ERROR)
                else:
                    halt(CRASHED_ERROR)
                raise
            finally:
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                while not queue.empty():
                    item = queue.get_nowait()
                    if item is not None:
                        unsent.append(item)
                try:
                    await _clean_up(db, engine, writer, unsent, inflight, owner=owner,
                                    max_attempts=max_attempts, reason=stop_reason[0] if stop_reason
                                    else CRASHED_ERROR, report=report)
                except Exception:
                    if failure is None:  # else the first error is the one to report
                        raise
            summary.token_fetches = tokens.fetches
    except BaseException as exc:
        failure = failure or exc
        raise
    finally:
        heartbeat.stop()
        executor.shutdown(wait=True)  # a statement cut off by an interruption finishes first
        if failure is not None:
            # whatever this owner still holds (e.g. claimed by a statement that completed after
            # the interruption): release it now instead of letting the lease run out
            with contextlib.suppress(Exception):
                ledger.unclaim_all(engine, owner=owner, error=INTERRUPTED_INFLIGHT
                                   if summary.interrupted else CRASHED_ERROR)
    summary.elapsed = time.monotonic() - started
    log.info("batch %s rows %s-%s loaded: %s", batch_id, chunk.first_id, chunk.last_id,
             ", ".join(f"{k} {v}" for k, v in sorted(summary.counts.items())) or "nothing to send")
    return summary


async def _clean_up(db, engine, writer, unsent, inflight, *, owner, max_attempts, reason, report) -> None:
    """Write what was answered, release what was never sent (with the true reason), and drop
    the claims of rows cut off mid-request. Runs even when the warehouse is failing: each step
    is tried, and the first warehouse error is raised at the end."""
    errors: list[BaseException] = []
    try:
        await writer.close()
    except Exception as exc:
        errors.append(exc)
    if unsent:
        try:
            await db(ledger.release, engine, unsent, owner=owner, error=reason, max_attempts=max_attempts)
        except Exception as exc:
            errors.append(exc)
        for item in unsent:
            inflight.discard(item.outbox_id)
            report(item.client_order_id, item.line, FAILED, sent=False)
    if inflight:  # cut off mid-request: outcome unknown, stays pending, claim dropped
        try:
            await db(ledger.unclaim_all, engine, owner=owner, error=INTERRUPTED_INFLIGHT)
        except Exception as exc:
            errors.append(exc)
        for _ in inflight:
            report(None, None, OutboxState.PENDING, sent=True)
        inflight.clear()
    if errors:
        raise errors[0]


def load_rows(
    engine: Engine,
    settings: Settings,
    rows: Iterable[Mapping[str, Any]],
    *,
    batch_id: int | None = None,
    owner: str | None = None,
    progress: Callable[[RowResult], None] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> LoadSummary:
    """Validated row dicts -> the outbox of `batch_id` (a new batch when None) -> loaded.

    The shortcut for callers without a file (tests, bench/load.py); files go through
    etl.orders.inbox (validate the whole file first, then load). Rows repeating a clientOrderId of
    the batch are counted `duplicate` and not sent."""
    batch_id = batch_id if batch_id is not None else outbox.adhoc_batch(engine)
    written = outbox.write(engine, batch_id, rows, vault=vault_for(settings.fernet_key, engine))
    summary = LoadSummary()
    if written.duplicates:
        summary.counts[DUPLICATE] += written.duplicates
    if written.unmappable:
        summary.counts[OutboxState.REJECTED] += written.unmappable
    found = outbox.chunks(engine, [batch_id], 1 << 62, max_attempts=settings.max_attempts)
    if not found:
        return summary
    (whole,) = found
    return summary.merge(load_chunk(engine, settings, whole, owner=owner or cli_owner(),
                                    progress=progress, transport=transport))


def _log_outcome(item: Prepared, outcome: Outcome, state: str) -> None:
    """PHI-free: clientOrderId, batch, line, state, HTTP status; never the vendor's text."""
    if outcome.state == FAILED:
        log.warning("order %s (batch %s, line %s): %s: %s",
                    item.client_order_id, item.batch_id, item.line, state, outcome.error)
    elif outcome.state == OutboxState.REJECTED:
        log.info("order %s (batch %s, line %s): rejected (HTTP %s); see `labsync status %s`",
                 item.client_order_id, item.batch_id, item.line, outcome.http_status, item.client_order_id)
    else:
        log.debug("order %s (batch %s, line %s): %s (HTTP %s, %d attempts)",
                  item.client_order_id, item.batch_id, item.line, outcome.state, outcome.http_status,
                  outcome.attempts)
