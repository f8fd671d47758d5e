"""Benchmark: a warehouse that has run for years. Does every step still cost only its own work?

For each warehouse (SQLite and PostgreSQL) two databases are made: one empty (migrated only), one
filled with a history by bulk inserts into the real tables (not timed): `--orders` ledger and
outbox rows over `--orders / 1000` batches, 2 items and 4 item-history rows per order, patients
(orders / 10), webhook events (orders / 5), audit rows (orders / 10) and open orders (orders /
25: items not final, checked a few minutes ago, as a running sweep leaves them; the rest have
their results stored). Then, on each, a new 1,000-row batch goes through the steps a DAG run and
a person take, each timed:

    prepare   validate the CSV into the outbox (inbox.prepare, as the order_batches DAG)
    load      PUT its rows (inbox.load_chunk per chunk, sandbox at latency 0)
    finish    statuses, summary page, file moved (inbox.finish)
    check     the run's verdict (inbox.check)
    summary   the batch's summary page written again (inbox.render)
    webhooks  100 stored order events of the batch applied (apply_webhooks: a GET each order)
    sweep     the lifecycle sweep (track with the stale window): the batch's 1,000 new orders
    results   the results due (fetch_results: none due; the choice itself is timed)
    batches   `labsync batches --since` the bench began (those batches and their counts)
    status    `labsync status --batch NAME` (the batch's rows and item statuses)
    track     `labsync track --batch NAME` (find the batch, GET its open orders)

Each step's time on the full history is printed beside the same step on the empty warehouse,
with the ratio (goal <= 1.5). `--repeat` rounds (3), the empty and the full warehouse taking turns
step by step, so a busy moment of a shared machine falls on both; the figure is the median (the
steps of a few milliseconds that change nothing run 5 times a round, by turns too). Then
the plans (EXPLAIN QUERY PLAN / EXPLAIN) of the statements that dominate, on the full history.

    .venv/bin/python bench/scale.py [--orders 250000] [--repeat 3] [--backends sqlite postgresql]
    .venv/bin/python bench/scale.py --orders 5000000      # the issue's sizes (5M orders, 20M history
                                                          #   rows, 500k patients, 1M events, 200k open)

The default is a twentieth of the issue's sizes (so it runs in minutes on a small machine) and says
so. PostgreSQL is a throwaway server started as the test suite does (tests/pgserver.py), or
LABSYNC_TEST_POSTGRES_URL; the filled database is ANALYZEd after the fill, as autovacuum would.
Each warehouse has its own sandbox, in a process of its own. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.load import _free_port, _start_sandbox  # noqa: E402  (the same sandbox as the load bench)

ISSUE_ORDERS = 5_000_000
# steps of a few milliseconds that can run again unchanged: taken AGAIN times a round (by turns
# too), so one busy moment of the machine does not make their median
IDEMPOTENT = {"check", "summary", "results", "batches", "status"}
AGAIN = 5
BATCH_ROWS = 1_000
PAGE = 20_000


# ---- the history: bulk inserts into the real tables ----------------------------------------------

def _ts(dt: datetime, sqlite: bool):
    return dt.strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite else dt


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _tables(orders: int, now: datetime, sqlite: bool) -> Iterator[tuple[str, list[str], Callable[[], Iterator[tuple]]]]:
    """(table, columns, rows) of the history: `orders` orders from three years ago to today."""
    batches = max(orders // 1000, 1)
    per_batch = orders // batches
    start = now - timedelta(days=3 * 365)
    span = (now - timedelta(hours=2) - start).total_seconds()
    open_every = 25  # 1 order in 25 is still open (kits out), checked a few minutes ago
    recent = _ts(now - timedelta(minutes=5), sqlite)
    true = 1 if sqlite else True

    def when(i: int) -> datetime:
        return start + timedelta(seconds=span * i / max(orders, 1))

    def batch_rows():
        for b in range(batches):
            at = when(b * per_batch)
            yield (b + 1, f"hist-{b:05d}.csv", _sha(f"batch{b}"), "loaded", _ts(at, sqlite),
                   _ts(at + timedelta(minutes=2), sqlite), per_batch, per_batch, 0, f"processed/hist-{b:05d}.csv")

    def order_rows():
        for i in range(orders):
            at = _ts(when(i), sqlite)
            items = json.dumps([{"code": "GLCS", "id": f"H{i}-1"}, {"code": "FCIT", "id": f"H{i}-2"}])
            yield (f"HIST-{i:08d}", i // per_batch + 1 if i // per_batch < batches else batches, i % per_batch + 2,
                   "accepted", 200, items, 1, _sha(str(i)), at, at, at)

    def outbox_rows():
        for i in range(orders):
            at = _ts(when(i), sqlite)
            yield (i + 1, min(i // per_batch + 1, batches), i % per_batch + 2, f"HIST-{i:08d}", None, _sha(str(i)),
                   "accepted", 200, 1, None, at, at)

    def item_rows():
        for i in range(orders):
            at = _ts(when(i), sqlite)
            is_open = i % open_every == 0
            status = "KitDispatched" if is_open else "ResultsAvailable"
            for k, code in ((1, "GLCS"), (2, "FCIT")):
                yield (f"H{i}-{k}", f"HIST-{i:08d}", code, status, at, "poll",
                       None if is_open else f"B{i:08d}{k}", at, at, recent if is_open else at,
                       None if is_open else at)

    def history_rows():
        n = 0
        for i in range(orders):
            at = _ts(when(i), sqlite)
            is_open = i % open_every == 0
            steps = ["Created", "KitDispatched"] if is_open else ["KitDispatched", "KitRegistered", "ResultsAvailable"]
            # 4 rows an order: both items' steps, up to 4
            rows = [(k, s) for k in (1, 2) for s in steps][:4]
            previous = None
            for k, status in rows:
                n += 1
                yield (n, f"H{i}-{k}", f"HIST-{i:08d}", status, previous, "poll", at, true, None, at)
                previous = status

    def patient_rows():
        for p in range(orders // 10):
            at = _ts(when(p * 10), sqlite)
            yield (f"pat_{p:08d}", "First", "Last", "1970-01-01", f"p{p}@example.org", _sha(f"p{p}"), at, at)

    def event_rows():
        for e in range(orders // 5):
            at = _ts(when(e * 5), sqlite)
            body = json.dumps({"type": "order", "body": {"clientOrderId": f"HIST-{e * 5:08d}"}}).encode()
            yield (e + 1, "lgc", _sha(f"ev{e}"), "order", "application/json", body, at, 1, "applied", 1, at, true)

    def audit_rows():
        for a in range(orders // 10):
            at = _ts(when(a * 10), sqlite)
            yield (a + 1, at, "airflow:order_batches.finish", "files_written", "batch", json.dumps([a // 100 + 1]), 1,
                   "summary")

    yield ("batch_files", ["id", "file_name", "sha256", "status", "received_at", "processed_at", "total_rows",
                           "valid_rows", "rejected_rows", "stored_as"], batch_rows)
    yield ("lgc_orders", ["client_order_id", "batch_id", "line", "state", "http_status", "order_item_ids",
                          "attempts", "payload_sha256", "created_at", "updated_at", "tracked_at"], order_rows)
    yield ("lgc_outbox", ["id", "batch_id", "line", "client_order_id", "body", "body_sha256", "outcome",
                          "http_status", "attempts", "last_error", "created_at", "updated_at"], outbox_rows)
    yield ("lgc_order_items", ["item_id", "client_order_id", "code", "status", "status_at", "status_source",
                               "barcode", "first_seen_at", "updated_at", "last_checked_at", "results_stored_at"],
           item_rows)
    yield ("lgc_item_status_history", ["id", "item_id", "client_order_id", "status", "previous_status", "source",
                                       "vendor_timestamp", "applied", "webhook_event_id", "recorded_at"], history_rows)
    yield ("rupa_patients", ["id", "first_name", "last_name", "birthday", "email", "content_sha256",
                             "first_seen_at", "last_seen_at"], patient_rows)
    yield ("webhook_events", ["id", "source", "sha256", "event_type", "content_type", "body", "received_at",
                              "deliveries", "state", "attempts", "applied_at", "authenticated"], event_rows)
    yield ("phi_access", ["id", "at", "actor", "action", "subject_kind", "subject_ids", "record_count", "detail"],
           audit_rows)


def fill(engine, orders: int) -> dict[str, int]:
    """The history, by the driver's bulk path (SQLite executemany, PostgreSQL COPY); rows per table."""
    sqlite = engine.dialect.name == "sqlite"
    now = datetime.now(UTC)
    counts: dict[str, int] = {}
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        for table, columns, rows in _tables(orders, now, sqlite):
            n = 0
            if sqlite:
                sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"
                page: list[tuple] = []
                for row in rows():
                    page.append(row)
                    if len(page) >= PAGE:
                        cur.executemany(sql, page)
                        n += len(page)
                        page = []
                if page:
                    cur.executemany(sql, page)
                    n += len(page)
            else:
                with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                    for row in rows():
                        copy.write_row(row)
                        n += 1
            raw.commit()
            counts[table] = n
        if not sqlite:  # identity sequences past the ids written by hand
            for table in ("batch_files", "lgc_outbox", "lgc_item_status_history", "webhook_events", "phi_access"):
                cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
            raw.commit()
            raw.driver_connection.autocommit = True
            raw.driver_connection.execute("VACUUM ANALYZE")  # what autovacuum does to a table that grew
        else:  # the fill's write-ahead log into the database now, not by a step later (a
            # checkpoint of a GB of log stalls the disk for every step running meanwhile)
            cur.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        # SQLite: no ANALYZE, as labsync never runs one (nor PRAGMA optimize): its planner then
        # takes an equality on an indexed column for a few rows. The sweep's ledger branches name
        # their index (INDEXED BY), so a warehouse someone did ANALYZE reads them the same way.
    finally:
        raw.close()
    return counts


# ---- one round of steps on one warehouse ---------------------------------------------------------

class Warehouse:
    """One warehouse (empty or full): its engine, settings, inbox; the steps of a 1,000-row batch."""

    def __init__(self, label: str, url: str, sandbox_url: str, tmp: Path) -> None:
        from etl import warehouse
        from etl.settings import RetrySettings, Settings
        from etl.vault import new_key

        self.label = label
        self.engine = warehouse.connect(url)
        base = Settings()
        self.inbox = tmp / f"inbox-{label}"
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.settings = replace(
            base, warehouse_url=url, inbox=self.inbox, fernet_key=new_key(),
            lgc=replace(base.lgc, base_url=f"{sandbox_url}/lgc", rate_limit=0, concurrency=20),
            rupa=replace(base.rupa, base_url=f"{sandbox_url}/rupa"),
            retry=RetrySettings(max_attempts=6, initial_wait=0.1, max_wait=2.0, timeout=30))
        self.times: dict[str, list[float]] = {}
        self.since = datetime.now(UTC)

    def write_batch(self, prefix: str) -> str:
        from tests.helpers import seed_row, write_csv

        rows = []
        for i in range(BATCH_ROWS):
            rows.append(seed_row(client_order_id=f"{prefix}-{i:05d}", participant_id=f"P{i:05d}",
                                 email=f"scale{i}@example.org", order_items="GLCS;FCIT"))
        name = f"{prefix}.csv"
        write_csv(self.inbox / name, rows)
        return name

    def steps(self, prefix: str) -> Iterator[tuple[str, Callable[[], object]]]:
        """The steps of one round, in order, each a (name, thunk): run by the caller, timed."""
        from etl.intake import records
        from etl.intake.inbox import open_inbox
        from etl.orders import inbox, ledger, lifecycle, outbox
        from etl.orders.results import fetch_results
        from etl.webhooks import store

        owner = f"bench:{prefix}"
        state: dict = {}
        name = self.write_batch(prefix)
        engine, settings = self.engine, self.settings

        def prepare():
            state["prepared"] = inbox.prepare(engine, settings, owner=owner, settle_seconds=0)

        def load():
            for chunk in state["prepared"]["chunks"]:
                inbox.load_chunk(engine, settings, chunk, owner=owner, file_owner=owner)

        def finish():
            state["outcomes"] = inbox.finish(engine, settings, state["prepared"], owner=owner)

        def check():
            inbox.check([o for o in state["outcomes"] if o.get("status") == "loaded"])

        def summary():
            batch_id = state["outcomes"][0]["batch_id"]
            inbox.render(engine, batch_id, records.get(engine, batch_id)["stored_as"], store=open_inbox(settings))

        def webhooks():
            for i in range(0, BATCH_ROWS, BATCH_ROWS // 100):
                body = json.dumps({"type": "order", "body": {"clientOrderId": f"{prefix}-{i:05d}",
                                                             "timestamp": datetime.now(UTC).isoformat()}})
                store.store_event(engine, "lgc", body.encode(), event_type="order", authenticated=True)
            lifecycle.apply_webhooks(engine, settings)

        def sweep():
            s = lifecycle.track(engine, settings, stale_after=settings.lifecycle.stale_after)
            state["swept"] = s.orders

        def results():
            fetch_results(engine, settings)

        def batches():  # --since the bench began: the same batches on both warehouses
            rows = records.recent(engine, limit=20, since=self.since)
            outbox.counts(engine, [b["id"] for b in rows])

        def status():
            ids = ledger.find_batch_ids(engine, name)
            rows = [r for b in ids for r in outbox.rows_of(engine, b)]
            lifecycle.item_statuses(engine, [r["client_order_id"] for r in rows])

        def track():
            ids = ledger.find_batch_ids(engine, name)
            lifecycle.track(engine, settings, batch_ids=ids)

        yield from (("prepare", prepare), ("load", load), ("finish", finish), ("check", check),
                    ("summary", summary), ("webhooks", webhooks), ("sweep", sweep), ("results", results),
                    ("batches", batches), ("status", status), ("track", track))
        state.clear()


def run_rounds(empty: Warehouse, full: Warehouse, repeat: int) -> None:
    """`repeat` rounds after one untimed (imports, caches, first connections); in each, the empty
    and the full warehouse take each step in turn."""
    for r in range(-1, repeat):
        first, second = (empty, full) if r % 2 == 0 else (full, empty)
        a = first.steps(f"SCALE{r + 1}{first.label[0].upper()}")
        b = second.steps(f"SCALE{r + 1}{second.label[0].upper()}")
        for (step, fa), (_, fb) in zip(a, b, strict=True):
            for _ in range(AGAIN if step in IDEMPOTENT else 1):
                for wh, fn in ((first, fa), (second, fb)):
                    started = time.perf_counter()
                    fn()
                    if r >= 0:
                        wh.times.setdefault(step, []).append(time.perf_counter() - started)


def plans(engine) -> list[tuple[str, list[str]]]:
    """The plans of the statements that dominate, on this warehouse."""
    import sqlalchemy as sa

    from etl.intake import records
    from etl.orders import ledger, lifecycle
    from etl.orders.results import candidates_query
    from etl.states import WebhookEventState
    from etl.warehouse.plans import explain
    from etl.warehouse.tables import lgc_orders, lgc_outbox, webhook_events

    stale = datetime.now(UTC) - timedelta(hours=1)
    batch_id = 5
    dialect = engine.dialect.name
    due, undescribed, unconfirmed = lifecycle.open_orders_statements(stale_before=stale, dialect=dialect)
    statements = [
        *((f"sweep: open items due ({which})", stmt) for which, stmt in zip(("checked before the window", "never checked"), due, strict=True)),
        ("sweep: orders no GET described yet", undescribed),
        ("sweep: unconfirmed orders", unconfirmed),
        ("sweep: ledger states of the orders due, by key", sa.select(lgc_orders.c.client_order_id).where(
            lgc_orders.c.client_order_id.in_(["HIST-00000000", "HIST-00000025"]), lgc_orders.c.state.in_(["accepted", "conflict"]))),
        ("track --batch: the batch's ledger rows", sa.select(lgc_orders.c.client_order_id, lgc_orders.c.state)
         .where(lgc_orders.c.batch_id.in_([batch_id]))),
        ("results: candidates", candidates_query()),
        ("webhooks: pending events", sa.select(webhook_events.c.id).where(
            webhook_events.c.source == "lgc",
            webhook_events.c.state.in_([WebhookEventState.RECEIVED, WebhookEventState.FAILED]))
         .order_by(webhook_events.c.id).limit(500)),
        ("batches: newest 20", records.recent_query(limit=20)),
        ("batches --since: received in the last hour", records.recent_query(limit=20, since=stale)),
        ("status/track --batch: find the batch", ledger.find_batch_ids_query("hist-00003.csv")),
        ("finish/summary: outbox counts of a batch", sa.select(lgc_outbox.c.outcome, sa.func.count())
         .where(lgc_outbox.c.batch_id.in_([batch_id])).group_by(lgc_outbox.c.outcome)),
    ]
    with engine.connect() as conn:
        return [(label, explain(conn, stmt)) for label, stmt in statements]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", type=int, default=ISSUE_ORDERS // 20,
                    help=f"ledger/outbox rows of the history (the issue's size: {ISSUE_ORDERS:,})")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    args = ap.parse_args()

    from etl import warehouse
    from tests.pgserver import PgServer, create_database, drop_database

    scale = args.orders / ISSUE_ORDERS
    print(f"labsync scale bench: history of {args.orders:,} orders ({scale:.0%} of the issue's {ISSUE_ORDERS:,}"
          + ("; smaller than the issue's: give --orders 5000000 for its sizes" if scale < 1 else "")
          + f"), a {BATCH_ROWS:,}-row batch, {args.repeat} rounds, {os.cpu_count()} CPUs", flush=True)
    server = None
    admin = os.environ.get("LABSYNC_TEST_POSTGRES_URL")
    if "postgresql" in args.backends and not admin:
        server = PgServer().start()
        admin = server.admin_url
    # a sandbox for each warehouse: two warehouses loading into one sandbox account by turns
    # stalled now one, now the other, for ~15 s (the vendor side's limits see one account)
    ports = {k: _free_port() for k in ("empty", "full")}
    sandboxes = [_start_sandbox(p) for p in ports.values()]
    urls_of = {k: f"http://127.0.0.1:{p}" for k, p in ports.items()}
    try:
        with tempfile.TemporaryDirectory(prefix="labsync-scale-") as tmp:
            for backend in args.backends:
                if backend == "sqlite":
                    urls = {k: f"sqlite:///{Path(tmp) / f'{k}.db'}" for k in ("empty", "full")}
                else:
                    urls = {k: create_database(admin) for k in ("empty", "full")}
                for url in urls.values():
                    warehouse.upgrade_url(url).dispose()
                started = time.perf_counter()
                filler = warehouse.connect(urls["full"])
                filled = fill(filler, args.orders)
                filler.dispose()
                print(f"\n{backend}: history filled in {time.perf_counter() - started:.0f}s (not timed below): "
                      + ", ".join(f"{t} {n:,}" for t, n in filled.items()), flush=True)
                empty = Warehouse("empty", urls["empty"], urls_of["empty"], Path(tmp) / backend)
                full = Warehouse("full", urls["full"], urls_of["full"], Path(tmp) / backend)
                run_rounds(empty, full, args.repeat)
                worst = 0.0
                print(f"{'step':<10} {'empty':>10} {'full':>10} {'full/empty':>11}   ({backend}, median of {args.repeat})")
                for step, times in empty.times.items():
                    e, f = statistics.median(times), statistics.median(full.times[step])
                    ratio = f / e if e > 0 else float("inf")
                    # steps of a millisecond or less: the ratio of two tiny times is noise
                    worst = max(worst, ratio if e > 0.005 or f > 0.005 else 1.0)
                    print(f"{step:<10} {e * 1000:>8.1f}ms {f * 1000:>8.1f}ms {ratio:>10.2f}x", flush=True)
                print(f"{backend}: the largest full/empty ratio of a step over 5 ms: {worst:.2f} (goal <= 1.5)")
                print(f"\n{backend}: plans on the full history")
                for label, lines in plans(full.engine):
                    print(f"  {label}")
                    for line in lines:
                        print(f"      {line}")
                for wh in (empty, full):
                    wh.engine.dispose()
                if backend != "sqlite":
                    for url in urls.values():
                        drop_database(url)
    finally:
        for sandbox in sandboxes:
            sandbox.terminate()
            sandbox.wait(timeout=10)
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
