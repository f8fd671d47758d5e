"""The ledger's rules, on SQLite and PostgreSQL: pending before the PUT, terminal rows skipped on
a rerun, a changed order flagged conflict without sending, claims that keep two runs from sending
the same order, and claims of dead runs taken over."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from urllib.parse import unquote

import httpx
import sqlalchemy as sa

from etl.lgc import ledger as lg
from etl.lgc.load import load_rows, prepare
from etl.warehouse import batch_files, lgc_orders
from tests.test_lgc_support import fast, ledger, order_row


def _lgc(sandbox):
    return sandbox.sandbox.lgc


class _Spy(httpx.AsyncBaseTransport):
    """Looks at the ledger row at the moment its PUT leaves."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.inner = httpx.AsyncHTTPTransport()
        self.seen: list[tuple[str, str | None, str | None]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            coid = unquote(request.url.raw_path.decode().rsplit("/", 1)[1])
            row = ledger(self.engine).get(coid)
            self.seen.append((coid, row and row["state"], row and row["claimed_by"]))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _batch(engine, name="b.csv") -> int:
    with engine.begin() as conn:
        return conn.execute(
            sa.insert(batch_files).values(file_name=name, sha256=name.ljust(64, "0"), status="received",
                                          received_at=datetime.now(UTC)).returning(batch_files.c.id)
        ).scalar_one()


def test_the_row_is_pending_and_claimed_before_its_put(engine, settings, sandbox):
    spy = _Spy(engine)
    batch = _batch(engine)
    summary = load_rows(engine, fast(settings, concurrency=3), [order_row(i) for i in range(12)],
                        batch_id=batch, transport=spy)
    assert summary.counts == {"accepted": 12}
    assert len(spy.seen) == 12
    assert all(state == "pending" and claimed for _, state, claimed in spy.seen)
    rows = ledger(engine)
    assert {r["batch_id"] for r in rows.values()} == {batch}
    assert sorted(r["line"] for r in rows.values()) == list(range(2, 14))


def test_a_rerun_skips_settled_rows_and_resends_failed_and_pending_ones(engine, settings, sandbox):
    lgc = _lgc(sandbox)
    lgc.forced.update({"ORD-00001": 400, "ORD-00002": 503})
    rows = [order_row(i) for i in range(4)]
    load_rows(engine, fast(settings), rows)
    # ORD-00003 accepted, then pretend a crash lost its outcome: pending, no claim
    with engine.begin() as conn:
        conn.execute(sa.update(lgc_orders).where(lgc_orders.c.client_order_id == "ORD-00003")
                     .values(state="pending", claimed_by=None, claimed_until=None))
    states = {k: v["state"] for k, v in ledger(engine).items()}
    assert states == {"ORD-00000": "accepted", "ORD-00001": "rejected", "ORD-00002": "failed",
                      "ORD-00003": "pending"}
    before = dict(lgc.put_count)
    lgc.forced.clear()
    again = load_rows(engine, fast(settings), rows)
    sent = {k: lgc.put_count[k] - before.get(k, 0) for k in lgc.put_count}
    assert sent == {"ORD-00000": 0, "ORD-00001": 0, "ORD-00002": 1, "ORD-00003": 1}
    assert again.counts == {"accepted": 3, "rejected": 1} and again.skipped == 2
    assert lgc.accepted_count["ORD-00003"] == 1  # re-sent, and the sandbox returned the same order
    row3 = ledger(engine)["ORD-00003"]
    assert row3["state"] == "accepted"
    assert row3["order_item_ids"] == lgc.orders["ORD-00003"]["response"]["orderItems"]


def test_a_changed_order_after_acceptance_is_a_local_conflict_not_sent(engine, settings, sandbox):
    first = _batch(engine, "first.csv")
    second = _batch(engine, "second.csv")
    load_rows(engine, fast(settings), [order_row(1)], batch_id=first)
    ids = ledger(engine)["ORD-00001"]["order_item_ids"]
    summary = load_rows(engine, fast(settings), [order_row(1, order_items="GLCS:3", line=7)],
                        batch_id=second)
    assert summary.counts == {"conflict": 1} and summary.sent == 0 and summary.exit_code == 0
    assert _lgc(sandbox).put_count["ORD-00001"] == 1
    row = ledger(engine)["ORD-00001"]
    assert row["state"] == "conflict" and row["http_status"] is None
    assert row["order_item_ids"] == ids  # what LetsGetChecked holds is not forgotten
    assert row["batch_id"] == second and row["line"] == 7
    assert f"batch {first}, line 3" in row["last_error"] and "not sent" in row["last_error"]


def test_a_corrected_row_after_a_rejection_is_sent_again(engine, settings, sandbox):
    bad = order_row(1, dob="1961-02-30")
    load_rows(engine, fast(settings), [bad])
    assert ledger(engine)["ORD-00001"]["state"] == "rejected"
    same = load_rows(engine, fast(settings), [bad])
    assert same.counts == {"rejected": 1} and same.sent == 0
    fixed = load_rows(engine, fast(settings), [order_row(1)])
    assert fixed.counts == {"accepted": 1} and fixed.sent == 1
    assert ledger(engine)["ORD-00001"]["state"] == "accepted"


def _claim_as(engine, coid: str, claimed_by: str, until: datetime) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(lgc_orders).where(lgc_orders.c.client_order_id == coid)
                     .values(state="pending", claimed_by=claimed_by, claimed_until=until))


def test_a_row_held_by_another_live_run_is_busy_until_its_lease_ends(engine, settings, sandbox):
    load_rows(engine, fast(settings), [order_row(1)])
    with engine.begin() as conn:
        conn.execute(sa.update(lgc_orders).values(state="failed"))
    now = datetime.now(UTC)
    _claim_as(engine, "ORD-00001", "other-host:4242:abc", now + timedelta(minutes=5))
    busy = load_rows(engine, fast(settings), [order_row(1)])
    assert busy.counts == {"busy": 1} and busy.sent == 0 and busy.exit_code == 1
    assert _lgc(sandbox).put_count["ORD-00001"] == 1
    _claim_as(engine, "ORD-00001", "other-host:4242:abc", now - timedelta(seconds=1))
    taken = load_rows(engine, fast(settings), [order_row(1)])
    assert taken.counts == {"accepted": 1} and taken.sent == 1


def test_a_row_claimed_by_a_dead_process_on_this_host_is_taken_over_at_once(engine, settings, sandbox):
    import socket
    import subprocess
    import sys

    load_rows(engine, fast(settings), [order_row(1)])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _claim_as(engine, "ORD-00001", f"{socket.gethostname()[:60]}:{dead.pid}:abc",
              datetime.now(UTC) + timedelta(minutes=5))
    summary = load_rows(engine, fast(settings), [order_row(1)])
    assert summary.counts == {"accepted": 1} and summary.sent == 1
    assert ledger(engine)["ORD-00001"]["claimed_by"] is None


def test_a_repeated_id_in_one_run_is_sent_once(engine, settings, sandbox):
    rows = [order_row(1), order_row(2), order_row(1, line=9)]
    summary = load_rows(engine, fast(settings), rows)
    assert summary.counts == {"accepted": 2, "duplicate": 1}
    assert _lgc(sandbox).put_count["ORD-00001"] == 1


def test_two_runs_racing_for_the_same_rows_each_row_goes_to_exactly_one(engine):
    items = [prepare(order_row(i)) for i in range(60)]
    results: dict[str, list] = {}
    barrier = threading.Barrier(2)

    def run(name: str) -> None:
        barrier.wait()
        out = []
        for start in range(0, len(items), 10):  # windows, interleaving with the other run
            out += lg.claim(engine, items[start:start + 10], run=name, batch_id=None)
        results[name] = out

    threads = [threading.Thread(target=run, args=(f"host:1:{n}",)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners: dict[str, list[str]] = {}
    for name, decisions in results.items():
        for d in decisions:
            if d.action == lg.SEND:
                winners.setdefault(d.item.client_order_id, []).append(name)
            else:
                assert d.action == lg.BUSY
    assert sorted(winners) == sorted(i.client_order_id for i in items)
    assert all(len(w) == 1 for w in winners.values())
    with engine.connect() as conn:
        claimed = dict(conn.execute(sa.select(lgc_orders.c.client_order_id, lgc_orders.c.claimed_by)).all())
    assert all(claimed[c] == w[0] for c, w in winners.items())


def test_a_crash_inside_the_loader_surfaces_and_leaves_no_claims(engine, settings, sandbox):
    def progress(result) -> None:
        if result.client_order_id == "ORD-00003":
            raise RuntimeError("boom")

    rows = [order_row(i) for i in range(120)]
    try:
        load_rows(engine, fast(settings, concurrency=2), rows, progress=progress)
    except RuntimeError as exc:
        assert str(exc) == "boom"
    else:
        raise AssertionError("the error was swallowed")
    left = ledger(engine)
    assert left and all(r["claimed_by"] is None for r in left.values())
    assert {r["state"] for r in left.values()} <= {"accepted", "failed", "pending"}
    again = load_rows(engine, fast(settings), rows)  # the next run finishes the batch
    assert again.counts == {"accepted": 120}
    assert set(_lgc(sandbox).accepted_count.values()) == {1}
