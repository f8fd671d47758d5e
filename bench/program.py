"""Benchmark: the program page for 100,000 orders, on SQLite and PostgreSQL (goal: under 10 s).

Fills a fresh warehouse (a SQLite file in a temp dir; PostgreSQL a throwaway server started as the
test suite does, tests/pgserver.py, or LABSYNC_TEST_POSTGRES_URL's) with N orders of one program,
one kit each, spread over 12 weeks and every stage, with their status history (what the tracker
writes: one row per stage reached, with the vendor's timestamps), some results stored and some
letters sent. Then times what `labsync program CODE` does: read the views, compute the numbers,
draw the charts, render the page and write it with its CSVs to a local inbox.

    .venv/bin/python bench/program.py [--orders 100000] [--repeat 3] [--backends sqlite postgresql]

Prints figures (the fill is not timed); asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PATH = ("Submitted", "Created", "KitDispatched", "KitRegistered", "KitArrivedAtLab", "ResultsAvailable")
PROGRAM = "Bench"


def fill(engine, orders: int) -> dict[str, int]:
    """N orders of one program with items, history, results and letters (bulk inserts)."""
    import sqlalchemy as sa

    from etl.warehouse.tables import (
        batch_files,
        lgc_item_status_history,
        lgc_order_items,
        lgc_order_programs,
        lgc_orders,
        lgc_outreach_letters,
        lgc_results,
    )

    now = datetime.now(UTC)
    base = now - timedelta(days=90)
    counts = dict.fromkeys(("orders", "items", "history", "results", "letters"), 0)
    with engine.begin() as conn:
        batch = conn.execute(sa.insert(batch_files).values(file_name="bench.csv", sha256="b" * 64, status="done",
                                                           received_at=now).returning(batch_files.c.id)).scalar_one()
    page = 5000
    for start in range(0, orders, page):
        o, p, it, h, r, lt = [], [], [], [], [], []
        for i in range(start, min(start + page, orders)):
            coid, item = f"B-{i:07d}", f"item-{i:07d}"
            sent = base + timedelta(days=(i % 84), hours=i % 24)
            end = i % 13  # how far it got: 0..5 on the path, 6 cancelled, 7 failed, more: results
            stop = min(end, 5) if end < 6 else (1 if end == 6 else 0 if end == 7 else 5)
            status = PATH[stop] if end not in (6, 7) else ("Cancelled" if end == 6 else "ValidationFailed")
            o.append(dict(client_order_id=coid, batch_id=batch, line=i + 2, state="accepted", attempts=1,
                          payload_sha256="0" * 64, created_at=sent, updated_at=sent))
            p.append(dict(client_order_id=coid, program_code=PROGRAM, participant_id=f"P{i:07d}", batch_id=batch,
                          recorded_at=sent))
            at = sent
            prev = None
            for k in range(stop + 1):
                at = at + timedelta(days=1 + (i + k) % 5, hours=i % 7) if k else sent
                h.append(dict(item_id=item, client_order_id=coid, status=PATH[k], previous_status=prev,
                              source="poll", vendor_timestamp=at, applied=True, recorded_at=at))
                prev = PATH[k]
            if end in (6, 7):
                at = at + timedelta(hours=3)
                h.append(dict(item_id=item, client_order_id=coid, status=status, previous_status=prev,
                              source="poll", vendor_timestamp=at, applied=True, recorded_at=at))
            barcode = f"LGC-{i:04d}-{i % 10000:04d}-{i % 7919:04d}" if stop >= 3 and end not in (6, 7) else None
            it.append(dict(item_id=item, client_order_id=coid, code="GLCS", status=status, status_at=at,
                           status_source="poll", barcode=barcode, vendor_created_at=sent, vendor_updated_at=at,
                           first_seen_at=sent, updated_at=at, last_checked_at=at))
            if status == "ResultsAvailable" and i % 3:
                r.append(dict(barcode=barcode, item_id=item, client_order_id=coid, json_body=b"{}", json_sha256="0" * 64,
                              fetched_at=at, value_count=0))
                lt.append(dict(letter_id=f"patient_{barcode}", barcode=barcode, audience="patient",
                               letter_type="PatientResultsLetter", status="DeliverySent", notified_at=at,
                               item_id=item, client_order_id=coid, first_seen_at=at, updated_at=at))
        with engine.begin() as conn:
            for table, rows, key in ((lgc_orders, o, "orders"), (lgc_order_programs, p, None),
                                     (lgc_order_items, it, "items"), (lgc_item_status_history, h, "history"),
                                     (lgc_results, r, "results"), (lgc_outreach_letters, lt, "letters")):
                if rows:
                    conn.execute(sa.insert(table), rows)
                if key:
                    counts[key] += len(rows)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(sa.text("ANALYZE"))
    return counts


def one_run(engine, inbox: Path) -> tuple[float, dict]:
    from etl.intake.storage import open_store
    from etl.program import page

    started = time.perf_counter()
    [written] = page.write(engine, None, PROGRAM, store=open_store(inbox))  # type: ignore[arg-type]
    return time.perf_counter() - started, written.counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    args = ap.parse_args()

    from etl import warehouse
    from tests.pgserver import PgServer, create_database

    print(f"labsync program-page bench: {args.orders:,} orders (one kit each), {args.repeat} rounds, "
          f"{os.cpu_count()} CPUs", flush=True)
    server = None
    admin = os.environ.get("LABSYNC_TEST_POSTGRES_URL")
    if "postgresql" in args.backends and not admin:
        server = PgServer().start()
        admin = server.admin_url
    try:
        with tempfile.TemporaryDirectory(prefix="labsync-program-") as tmp:
            for backend in args.backends:
                url = f"sqlite:///{Path(tmp) / 'w.db'}" if backend == "sqlite" else create_database(admin)
                warehouse.upgrade_url(url).dispose()
                engine = warehouse.connect(url)
                started = time.perf_counter()
                filled = fill(engine, args.orders)
                print(f"\n{backend}: filled in {time.perf_counter() - started:.0f}s (not timed): "
                      + ", ".join(f"{k} {v:,}" for k, v in filled.items()), flush=True)
                inbox = Path(tmp) / f"inbox-{backend}"
                inbox.mkdir()
                times = []
                for _ in range(args.repeat):
                    elapsed, lists = one_run(engine, inbox)
                    times.append(elapsed)
                    print(f"  page in {elapsed:.2f}s (lists: {lists})", flush=True)
                size = (inbox / "programs" / PROGRAM / "index.html").stat().st_size
                best, median = min(times), statistics.median(times)
                print(f"{backend}: median {median:.2f}s, best {best:.2f}s for {args.orders:,} orders "
                      f"(goal < 10 s: {'met' if median < 10 else 'NOT met'}); page {size / 1024:.0f} KiB")
                engine.dispose()
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
