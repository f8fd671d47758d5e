"""One vendor budget for the whole deployment: `LGC_RATE_LIMIT` orders per second and
`LGC_CONCURRENCY` requests in flight hold however many loaders run at once (parallel Airflow
load tasks on different machines, CLI runs), because they share it through the warehouse, the
only thing they have in common.

Rate: `vendor_budget` holds, per LetsGetChecked account, the next free send slot. A loader
reserves a block of slots (about `BLOCK_SECONDS` worth: 10 slots at 100/s) with one atomic
`UPDATE … RETURNING`, computed with the database's clock, so machines whose clocks disagree
still get disjoint slots; it then spaces its requests locally, one slot each. Idle time is not
banked (a block starts at the later of the next free slot and now), and a slot is used at most
one block's time late (a slower loader drops the rest rather than send them in a burst), so any
second holds at most the limit plus one block (10 %). All loaders together
write about ten reservations a second, whatever their number.

Concurrency: `vendor_budget_leases` has a row per live loader: how many requests it could use
(`want`), how many it may have in flight (`held`) and until when that holds (`lease_until`, DB
clock). Every `TICK` seconds each loader renews its lease and takes its fair share: the limit
is split among the live loaders that want it (water-filling, so one that wants less leaves the
rest to others), never taking more than is free. A loader gives slots back by first holding
fewer requests locally and only then lowering `held`, so the sum of what is on the wire never
exceeds the limit. A SIGKILLed loader stops renewing: its lease lapses after `LEASE` seconds and
its slots go to the others. Changes take effect within a tick or two.

`AsyncBudget(lgc)` without an engine keeps all of this in the process (unit tests of the
client; a single process). Each request does `await budget.acquire()` (a concurrency slot,
then a rate slot) and `budget.release()` when its answer is in.

Airflow: load tasks run in the pool `lgc_api`. The budget in the warehouse is what bounds the
vendor; the pool only keeps workers from sitting idle waiting for it: `pool_slots(lgc)` is the
number of load tasks that can each get at least two concurrent requests (`labsync budget
--pool-slots` prints it for `airflow pools set`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Mapping
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.dialects import postgresql, sqlite

from etl.errors import Aborted
from etl.settings import LgcSettings
from etl.warehouse.tables import vendor_budget, vendor_budget_leases

log = logging.getLogger(__name__)

BLOCK_SECONDS = 0.1  # rate slots reserved at a time, in seconds' worth
TICK = 0.5  # how often a loader renews its lease and re-balances concurrency
LEASE = 15.0  # a loader that stops renewing loses its slots after this long
MIN_SHARE = 2  # requests in flight a load task should get, for pool_slots
# Loaders book at most a block ahead each, so the next free slot is never far off; one further
# ahead than this means the database's clock was set back: start again from now.
MAX_AHEAD = 60.0

vb, lease_t = vendor_budget, vendor_budget_leases


def budget_key(lgc: LgcSettings) -> str:
    """One budget per LetsGetChecked account: the API host and the clientId."""
    return f"lgc {urlsplit(lgc.base_url).netloc} {lgc.client_id}"[:200]


def pool_slots(lgc: LgcSettings, *, per_task: int = MIN_SHARE) -> int:
    """Size of the Airflow pool `lgc_api`: as many load tasks as can each get `per_task`
    requests in flight out of LGC_CONCURRENCY (at least 1). More tasks would only wait."""
    return max(1, lgc.concurrency // max(1, per_task))


def fair_shares(total: int, wants: Mapping[str, int]) -> dict[str, int]:
    """Split `total` slots among holders by water-filling: a holder that wants less than an even
    share gets what it wants, the rest is split evenly, remainders to the first holders by id."""
    alloc = {h: 0 for h in wants}
    active = sorted(h for h, w in wants.items() if w > 0)
    remaining = total
    while active and remaining > 0:
        base, extra = divmod(remaining, len(active))
        content = [h for h in active if wants[h] - alloc[h] <= base]
        if content:
            for h in content:
                remaining -= wants[h] - alloc[h]
                alloc[h] = wants[h]
            active = [h for h in active if h not in content]
            continue
        for i, h in enumerate(active):
            alloc[h] += base + (1 if i < extra else 0)
        break
    return alloc


def budget_status(engine: Engine, lgc: LgcSettings) -> dict:
    """What `labsync budget` shows: the limits, the pool size, and the live loaders now."""
    key = budget_key(lgc)
    with engine.connect() as conn:
        now = float(conn.execute(sa.select(_db_now(conn.dialect.name))).scalar_one())
        next_slot = conn.execute(sa.select(vb.c.next_slot).where(vb.c.vendor == key)).scalar()
        rows = conn.execute(
            sa.select(lease_t.c.holder, lease_t.c.want, lease_t.c.held, lease_t.c.lease_until)
            .where(lease_t.c.vendor == key, lease_t.c.lease_until > now)
            .order_by(lease_t.c.holder)
        ).all()
    return {
        "vendor": key, "rate_limit": lgc.rate_limit, "concurrency": lgc.concurrency,
        "pool_slots": pool_slots(lgc),
        "booked_ahead": round(max(0.0, (next_slot or 0.0) - now), 3),
        "loaders": [{"holder": r.holder, "want": r.want, "held": r.held,
                     "lease_left": round(r.lease_until - now, 1)} for r in rows],
    }


def _db_now(dialect: str):
    """Seconds since the epoch on the database's clock, as a SQL expression."""
    if dialect == "postgresql":
        return sa.cast(sa.func.extract("epoch", sa.func.clock_timestamp()), sa.Double)
    return (sa.func.julianday("now") - 2440587.5) * 86400.0


def _insert(conn: sa.Connection, table: sa.Table):
    return postgresql.insert(table) if conn.dialect.name == "postgresql" else sqlite.insert(table)


class AsyncBudget:
    """The budget one loader awaits before each request. `engine=None`: process-local."""

    def __init__(
        self,
        lgc: LgcSettings,
        engine: Engine | None = None,
        *,
        holder: str | None = None,
        tick: float = TICK,
        lease: float = LEASE,
        block_seconds: float = BLOCK_SECONDS,
        clock=time.monotonic,
    ) -> None:
        self.engine = engine
        self.key = budget_key(lgc)
        self.holder = (holder or "loader")[:160] + ":" + uuid.uuid4().hex[:12]
        self.concurrency = max(1, lgc.concurrency)
        self.tick, self.lease = tick, lease
        self._clock = clock
        # rate: blocks of slots, each slot a local monotonic time
        self.interval = 1.0 / lgc.rate_limit if lgc.rate_limit > 0 else 0.0
        self.block = max(1, round(lgc.rate_limit * block_seconds)) if self.interval else 0
        self._stale = max(self.block * self.interval, self.interval)
        self._t0, self._n, self._i = 0.0, 0, 0
        self._local_next = 0.0
        self._reserving = asyncio.Lock()
        # concurrency: local permits up to `limit` (the share the warehouse granted)
        self.limit = self.concurrency if engine is None else 0
        self.in_use = 0
        self.peak_in_use = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._peak_demand = 0
        self._wake: asyncio.Event | None = None
        self._syncer: asyncio.Task | None = None
        self._synced_at = 0.0
        self._error: BaseException | None = None
        self.reservations = 0  # rate blocks taken from the warehouse (logs, bench)
        self.syncs = 0

    # ---- life ----------------------------------------------------------------------------
    async def start(self) -> AsyncBudget:
        """Take this loader's first share (with an engine; a local budget needs no start)."""
        if self.engine is not None:
            self._wake = asyncio.Event()
            await asyncio.to_thread(self._ensure_rows)
            await self._sync(want=self.concurrency)
            self._syncer = asyncio.create_task(self._sync_loop())
        return self

    async def close(self) -> None:
        """Give everything back at once (the others need not wait for the lease to lapse)."""
        if self._syncer is not None:
            self._syncer.cancel()
            await asyncio.gather(self._syncer, return_exceptions=True)
            self._syncer = None
        if self.engine is not None:
            try:
                await asyncio.to_thread(self._drop_lease)
            except Exception as exc:  # the lease lapses by itself
                log.warning("could not return the LetsGetChecked budget (%s); it lapses in %.0fs",
                            type(exc).__name__, self.lease)

    async def __aenter__(self) -> AsyncBudget:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---- one request -----------------------------------------------------------------------
    async def acquire(self, abort: asyncio.Future | None = None) -> None:
        """Wait for a concurrency slot, then for a rate slot. Raises Aborted when `abort`
        completes first (nothing is then held)."""
        await self._permit(abort)
        try:
            if self.interval:
                await self._rate_slot(abort)
        except BaseException:
            self.release()
            raise

    def try_acquire(self) -> bool:
        """`acquire` without waiting, when nothing needs waiting for (no rate limit, a slot
        free, nobody queued): the common case, without a coroutine."""
        if self.interval or self.in_use >= self.limit or self._waiters or self._error is not None:
            return False
        self._peak_demand = max(self._peak_demand, self.in_use + 1)
        self._take()
        return True

    def release(self) -> None:
        """The request's answer is in (or it never started): its concurrency slot is free."""
        self.in_use -= 1
        self._hand_over()

    # ---- concurrency, locally ------------------------------------------------------------
    async def _permit(self, abort: asyncio.Future | None) -> None:
        if self._error is not None:
            raise self._error
        live_waiters = sum(1 for f in self._waiters if not f.done())
        self._peak_demand = max(self._peak_demand, self.in_use + live_waiters + 1)
        if self.in_use < self.limit and not live_waiters:
            self._take()
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        if self._wake is not None and self.limit == 0:
            self._wake.set()  # holding nothing: ask the warehouse now, not at the next tick
        waits = {fut} if abort is None else {fut, abort}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release()  # handed a slot just as we were cancelled
            else:
                fut.cancel()
            raise
        if fut.done():
            fut.result()  # raises the warehouse error that stopped the budget
            return
        fut.cancel()
        raise Aborted

    def _take(self) -> None:
        self.in_use += 1
        if self.in_use > self.peak_in_use:
            self.peak_in_use = self.in_use

    def _hand_over(self) -> None:
        while self._waiters and self.in_use < self.limit:
            fut = self._waiters.popleft()
            if not fut.done():
                self._take()
                fut.set_result(None)
        while self._waiters and self._waiters[0].done():
            self._waiters.popleft()

    def _fail_waiters(self, exc: BaseException) -> None:
        self._error = exc
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)

    # ---- rate --------------------------------------------------------------------------------
    async def _rate_slot(self, abort: asyncio.Future | None) -> None:
        while True:
            now = self._clock()
            while self._i < self._n:
                at = self._t0 + self._i * self.interval
                self._i += 1
                if at >= now - self._stale:  # else: too late to use without a burst; dropped
                    delay = at - now
                    if delay > 0:
                        if abort is None:
                            await asyncio.sleep(delay)
                        else:
                            await asyncio.wait({abort}, timeout=delay)
                            if abort.done():
                                raise Aborted
                    return
            await self._reserve()

    async def _reserve(self) -> None:
        async with self._reserving:
            if self._i < self._n:
                return  # another request reserved a block while we waited
            span = self.block * self.interval
            if self.engine is None:
                now = self._clock()
                start = max(self._local_next, now)
                self._local_next = start + span
                self._t0 = start
            else:
                start, db_now = await asyncio.to_thread(self._reserve_rows, span)
                # the database's time mapped onto ours: never earlier than the slot's DB time
                self._t0 = self._clock() + (start - db_now)
                self.reservations += 1
            self._n, self._i = self.block, 0

    # ---- the warehouse ---------------------------------------------------------------------
    def _engine(self) -> Engine:
        """The warehouse of a shared budget (these methods run only when there is one)."""
        if self.engine is None:
            raise RuntimeError("a process-local budget has no warehouse rows")
        return self.engine

    def _ensure_rows(self) -> None:
        with self._engine().begin() as conn:
            conn.execute(
                _insert(conn, vb).on_conflict_do_nothing(index_elements=["vendor"]),
                {"vendor": self.key, "next_slot": 0.0},
            )

    def _reserve_rows(self, span: float) -> tuple[float, float]:
        """Take the next `span` seconds of send slots: (start, now), both on the DB's clock."""
        with self._engine().begin() as conn:
            dialect = conn.dialect.name
            now = _db_now(dialect)
            later = sa.func.greatest if dialect == "postgresql" else sa.func.max
            start = sa.case((vb.c.next_slot > now + MAX_AHEAD, now), else_=later(vb.c.next_slot, now))
            row = conn.execute(
                sa.update(vb)
                .where(vb.c.vendor == self.key)
                .values(next_slot=start + span)
                .returning(vb.c.next_slot, now.label("now"))
            ).one()
        return float(row.next_slot) - span, float(row.now)

    def _sync_rows(self, want: int, floor: int) -> int:
        """Renew this loader's lease and take its fair share. Records `held` no lower than
        `floor` (what this loader may still have in flight). Returns the share granted."""
        with self._engine().begin() as conn:
            dialect = conn.dialect.name
            if dialect == "postgresql":  # one re-balance at a time per account
                conn.execute(sa.select(vb.c.vendor).where(vb.c.vendor == self.key).with_for_update())
            else:  # SQLite: a write first takes the database's write lock for the transaction
                conn.execute(sa.update(vb).where(vb.c.vendor == self.key)
                             .values(next_slot=vb.c.next_slot))
            now = float(conn.execute(sa.select(_db_now(dialect))).scalar_one())
            rows = conn.execute(
                sa.select(lease_t.c.holder, lease_t.c.want, lease_t.c.held, lease_t.c.lease_until)
                .where(lease_t.c.vendor == self.key)
            ).all()
            others = [r for r in rows if r.holder != self.holder and r.lease_until > now]
            shares = fair_shares(self.concurrency, {**{r.holder: r.want for r in others},
                                                    self.holder: want})
            free = self.concurrency - sum(r.held for r in others)
            granted = max(0, min(shares[self.holder], free))
            values = {"want": want, "held": max(granted, floor), "lease_until": now + self.lease}
            stmt = _insert(conn, lease_t)
            conn.execute(
                stmt.on_conflict_do_update(index_elements=["vendor", "holder"], set_=values),
                {"vendor": self.key, "holder": self.holder, **values},
            )
            conn.execute(sa.delete(lease_t).where(lease_t.c.vendor == self.key,
                                                  lease_t.c.lease_until < now - self.lease))
        return granted

    def _drop_lease(self) -> None:
        with self._engine().begin() as conn:
            conn.execute(sa.delete(lease_t).where(lease_t.c.vendor == self.key,
                                                  lease_t.c.holder == self.holder))

    async def _sync(self, want: int | None = None) -> None:
        if want is None:
            live_waiters = sum(1 for f in self._waiters if not f.done())
            want = min(self.concurrency, max(self._peak_demand, self.in_use + live_waiters))
        self._peak_demand = self.in_use
        floor = max(self.limit, self.in_use)  # what may be on the wire until we shrink locally
        granted = await asyncio.to_thread(self._sync_rows, want, floor)
        self.syncs += 1
        self._synced_at = self._clock()
        if granted != self.limit:
            log.debug("LetsGetChecked budget: %d of %d requests in flight for this loader",
                      granted, self.concurrency)
        self.limit = granted
        self._hand_over()

    async def _sync_loop(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.tick)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._sync()
            except Exception as exc:
                if self._clock() - self._synced_at < self.lease * 0.8:
                    log.warning("could not renew the LetsGetChecked budget (%s); retrying",
                                type(exc).__name__)
                    await asyncio.sleep(self.tick)
                    continue
                # our lease is about to lapse: others may take our slots, so stop sending
                self.limit = 0
                self._fail_waiters(exc)
                return
            await asyncio.sleep(min(self.tick, 0.05))  # a wake-up storm costs one sync per 50 ms
