"""Who holds a claim in the warehouse, and keeping it alive while they work.

Claims (on a batch file in `batch_files`, on a clientOrderId in `lgc_orders`) are owned by a
name that means something on a real cluster, never by a hostname or a PID:

    ti:{dag_id}/{run_id}/{task_id}/{map_index}   an Airflow task instance (without its try
                                                 number, so a retry of the same task instance,
                                                 on whatever worker, takes its own rows over at once)
    run:{dag_id}/{run_id}                        an Airflow DAG run (it holds the files it processes
                                                 from prepare to finish)
    cli:{uuid}                                   one `labsync` command run

A claim carries a lease (`claimed_until`). `Heartbeat` renews every claim of its owners every
`heartbeat_seconds` while the work goes on; a claim whose lease has lapsed (its owner died, or
hung for longer than the lease) is taken over by anyone. Liveness is only ever this lease, so two
loaders in different PID namespaces on one host can never mistake each other for dead.

Leases are compared with the clock of the machine that writes them: keep workers' clocks in sync
(NTP), as Airflow itself requires.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy import Engine

from etl.warehouse.tables import batch_files, lgc_orders, rupa_order_intents

# every table whose rows carry a claim (claimed_by, claimed_until) that a heartbeat renews
CLAIM_TABLES = (lgc_orders, batch_files, rupa_order_intents)

log = logging.getLogger(__name__)

MAX_OWNER = 100  # the width of the claimed_by columns


def _fit(owner: str) -> str:
    """Owners longer than the column keep their start and a hash of the whole (deterministic,
    so a retried task instance still derives the same owner)."""
    if len(owner) <= MAX_OWNER:
        return owner
    digest = hashlib.sha256(owner.encode()).hexdigest()[:16]
    return f"{owner[:MAX_OWNER - 17]}~{digest}"


def task_owner(dag_id: str, run_id: str, task_id: str, map_index: int | None = -1) -> str:
    return _fit(f"ti:{dag_id}/{run_id}/{task_id}/{-1 if map_index is None else map_index}")


def run_owner(dag_id: str, run_id: str) -> str:
    return _fit(f"run:{dag_id}/{run_id}")


def cli_owner() -> str:
    return f"cli:{uuid.uuid4()}"


def now() -> datetime:
    return datetime.now(UTC)


def aware(ts: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive (they were stored as UTC)."""
    if ts is not None and ts.tzinfo is None:
        return ts.replace(tzinfo=UTC)
    return ts


def is_live(claimed_by: str | None, claimed_until: datetime | None, *, at: datetime | None = None) -> bool:
    return claimed_by is not None and (aware(claimed_until) or datetime.min.replace(tzinfo=UTC)) >= (at or now())


def renew(engine: Engine, owners: Iterable[str], lease: timedelta) -> int:
    """Push the lease of every claim these owners hold (order rows, batch files, intents rows) to now+lease.
    Returns how many claims were renewed."""
    owners = [o for o in dict.fromkeys(owners) if o]
    if not owners:
        return 0
    until = now() + lease
    with engine.begin() as conn:
        return sum(conn.execute(_renewal(conn, t, owners).values(claimed_until=until)).rowcount
                   for t in CLAIM_TABLES)


def _renewal(conn: sa.Connection, t: sa.Table, owners: list[str]):
    """The UPDATE that renews `owners`' claims in `t`. On PostgreSQL it skips rows another
    transaction holds right now (the owner's own claim or record, which set or drop the lease
    themselves): a renewal that waited for them, locking in its own order, could deadlock with
    a record locking the same rows in clientOrderId order."""
    if conn.dialect.name != "postgresql":
        return sa.update(t).where(t.c.claimed_by.in_(owners))
    (key,) = t.primary_key.columns
    free = sa.select(key).where(t.c.claimed_by.in_(owners)).with_for_update(skip_locked=True)
    return sa.update(t).where(key.in_(free.scalar_subquery()))


class Heartbeat:
    """Renews the claims of `owners` every `interval` seconds in a background thread, until
    stopped. A failed renewal (the warehouse briefly away) is logged and retried at the next
    beat; the work itself notices a warehouse that stays away."""

    def __init__(self, engine: Engine, owners: Iterable[str], *, lease: timedelta, interval: float) -> None:
        self.engine, self.lease, self.interval = engine, lease, interval
        self.owners = list(dict.fromkeys(o for o in owners if o))
        self.beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="labsync-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                renew(self.engine, self.owners, self.lease)
                self.beats += 1
            except Exception as exc:  # keep beating; the loader's own writes report the outage
                log.warning("heartbeat: could not renew claims (%s)", type(exc).__name__)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + 5)

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
