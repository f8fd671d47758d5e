"""The ledger's rules and its claims, on SQLite and PostgreSQL: pending before the PUT, settled
rows never sent again (across batches too), a changed order flagged conflict without sending,
claims owned by task instances with leases: a live claim is never sent by anyone else, whatever
their host or PID, a retried task instance takes its own rows over at once, a lapsed lease is
taken over by anyone."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import timedelta
from urllib.parse import unquote

import httpx
import sqlalchemy as sa

from etl.claims import now, task_owner
from etl.orders import ledger as lg
from etl.orders import outbox
from etl.orders.load import load_rows
from etl.warehouse import lgc_orders
from tests.test_lgc_support import fast, ledger, load_batch, order_row, outbox_rows, stage_rows


def _lgc(sandbox):
    return sandbox.sandbox.lgc


class _Spy(httpx.AsyncBaseTransport):
    """Looks at the ledger and outbox rows at the moment their PUT leaves."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.inner = httpx.AsyncHTTPTransport()
        self.seen: list[tuple[str, str | None, str | None, str | None]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            coid = unquote(request.url.raw_path.decode().rsplit("/", 1)[1])
            row = ledger(self.engine).get(coid)
            box = outbox_rows(self.engine).get(coid)
            self.seen.append((coid, row and row["state"], row and row["claimed_by"], box and box["outcome"]))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _items(engine, batch_id: int) -> list[lg.Prepared]:
    (chunk,) = outbox.chunks(engine, [batch_id], 1 << 40, max_attempts=5)
    from etl.vault import vault_for
    from tests.conftest import TEST_FERNET_KEY

    vault = vault_for(TEST_FERNET_KEY, engine)
    return [i for page in outbox.pages(engine, chunk, size=1000, max_attempts=5, vault=vault) for i in page]


def test_the_row_is_pending_and_claimed_before_its_put(engine, settings, sandbox):
    spy = _Spy(engine)
    batch = stage_rows(engine, [order_row(i) for i in range(12)])
    summary = load_batch(engine, fast(settings, concurrency=3), batch, owner="cli:spy", transport=spy)
    assert summary.counts == {"accepted": 12}
    assert len(spy.seen) == 12
    assert all(state == "pending" and claimed == "cli:spy" and box == "pending" for _, state, claimed, box in spy.seen)
    rows = ledger(engine)
    assert {r["batch_id"] for r in rows.values()} == {batch}
    assert sorted(r["line"] for r in rows.values()) == list(range(2, 14))
    boxed = outbox_rows(engine, batch)
    assert {r["outcome"] for r in boxed.values()} == {"accepted"}
    assert all(r["body"] is None and r["attempts"] == 1 for r in boxed.values())  # PHI gone once settled


def test_a_rerun_skips_settled_rows_and_resends_failed_and_pending_ones(engine, settings, sandbox):
    lgc = _lgc(sandbox)
    lgc.forced.update({"ORD-00001": 400, "ORD-00002": 503})
    batch = stage_rows(engine, [order_row(i) for i in range(4)])
    # ORD-00003 was claimed by a load task that then died: pending, lease lapsed, nothing sent
    (dead,) = [i for i in _items(engine, batch) if i.client_order_id == "ORD-00003"]
    lg.claim(engine, [dead], owner=task_owner("order_batches", "r1", "load", 3), lease=timedelta(seconds=5),
             now=now() - timedelta(minutes=1))
    first = load_batch(engine, fast(settings), batch)
    assert first.counts == {"accepted": 2, "rejected": 1, "failed": 1}  # the lapsed claim was taken over
    states = {k: v["outcome"] for k, v in outbox_rows(engine, batch).items()}
    assert states == {"ORD-00000": "accepted", "ORD-00001": "rejected", "ORD-00002": "failed",
                      "ORD-00003": "accepted"}
    assert outbox_rows(engine, batch)["ORD-00002"]["body"] is not None  # kept: it goes out again
    before = dict(lgc.put_count)
    lgc.forced.clear()
    again = load_batch(engine, fast(settings), batch)
    sent = {k: lgc.put_count[k] - before.get(k, 0) for k in lgc.put_count}
    assert sent == {"ORD-00000": 0, "ORD-00001": 0, "ORD-00002": 1, "ORD-00003": 0}
    assert again.counts == {"accepted": 1}
    assert outbox_rows(engine, batch)["ORD-00002"]["attempts"] == 2
    assert set(lgc.accepted_count.values()) == {1}


def test_an_order_settled_by_an_earlier_batch_is_not_sent_again(engine, settings, sandbox):
    load_rows(engine, fast(settings), [order_row(1), order_row(2, dob="1961-02-30")])
    later = stage_rows(engine, [order_row(1), order_row(2, dob="1961-02-30")], name="later.csv")
    summary = load_batch(engine, fast(settings), later)
    assert summary.counts == {"already_settled": 2} and summary.sent == 0 and summary.exit_code == 0
    rows = outbox_rows(engine, later)
    assert "already accepted" in rows["ORD-00001"]["last_error"]
    assert "already rejected" in rows["ORD-00002"]["last_error"]
    assert all(r["body"] is None for r in rows.values())
    assert _lgc(sandbox).put_count == {"ORD-00001": 1, "ORD-00002": 1}


def test_a_changed_order_after_acceptance_is_a_conflict_not_sent(engine, settings, sandbox):
    first = stage_rows(engine, [order_row(1)], name="first.csv")
    load_batch(engine, fast(settings), first)
    ids = ledger(engine)["ORD-00001"]["order_item_ids"]
    second = stage_rows(engine, [order_row(1, order_items="GLCS:3", line=7)], name="second.csv")
    summary = load_batch(engine, fast(settings), second)
    assert summary.counts == {"conflict": 1} and summary.sent == 0 and summary.exit_code == 0
    assert _lgc(sandbox).put_count["ORD-00001"] == 1
    row = ledger(engine)["ORD-00001"]  # what LetsGetChecked holds is not forgotten
    assert row["state"] == "accepted" and row["order_item_ids"] == ids and row["batch_id"] == first
    box = outbox_rows(engine, second)["ORD-00001"]
    assert box["outcome"] == "conflict" and box["line"] == 7 and box["body"] is None
    assert f"batch {first}, line 3" in box["last_error"] and "not sent" in box["last_error"]


def test_a_corrected_row_after_a_rejection_is_sent_again(engine, settings, sandbox):
    bad = order_row(1, dob="1961-02-30")
    load_rows(engine, fast(settings), [bad])
    assert ledger(engine)["ORD-00001"]["state"] == "rejected"
    same = load_rows(engine, fast(settings), [bad])
    assert same.counts == {"already_settled": 1} and same.sent == 0
    fixed = load_rows(engine, fast(settings), [order_row(1)])
    assert fixed.counts == {"accepted": 1} and fixed.sent == 1
    assert ledger(engine)["ORD-00001"]["state"] == "accepted"


def _hold(engine, batch: int, owner: str, *, lease: timedelta, at=None) -> list[lg.Prepared]:
    items = _items(engine, batch)
    decisions = lg.claim(engine, items, owner=owner, lease=lease, now=at)
    assert {d.action for d in decisions} == {lg.SEND}
    return items


def test_a_live_claim_is_never_sent_by_another_task_instance_whatever_its_pid(engine, settings, sandbox):
    """Two task instances on one host, in different PID namespaces: the first claimed the rows
    and its process is gone from the second's view (a pid that does not exist here). Its lease
    is live, so the second sends nothing; once the lease lapses, the rows are taken over."""
    batch = stage_rows(engine, [order_row(i) for i in range(5)])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer exists, as a task in another PID namespace looks from here
    first = task_owner("order_batches", "scheduled__2026-01-01", "load", 0)
    assert str(gone.pid) not in first  # owners name task instances, never hosts or pids
    _hold(engine, batch, first, lease=timedelta(minutes=5))
    second = task_owner("order_batches", "manual__2026-01-01", "load", 0)
    busy = load_batch(engine, fast(settings), batch, owner=second)
    assert busy.counts == {"busy": 5} and busy.sent == 0 and busy.exit_code == 1
    assert _lgc(sandbox).put_count == {}
    assert {r["claimed_by"] for r in ledger(engine).values()} == {first}
    with engine.begin() as conn:  # the first instance stopped renewing: its lease lapses
        conn.execute(sa.update(lgc_orders).values(claimed_until=now() - timedelta(seconds=1)))
    taken = load_batch(engine, fast(settings), batch, owner=second)
    assert taken.counts == {"accepted": 5} and taken.sent == 5
    assert set(_lgc(sandbox).accepted_count.values()) == {1}


def test_a_retried_task_instance_takes_over_its_own_rows_at_once(engine, settings, sandbox):
    batch = stage_rows(engine, [order_row(i) for i in range(6)])
    ti = task_owner("order_batches", "scheduled__2026-01-01", "load", 2)
    _hold(engine, batch, ti, lease=timedelta(minutes=10))  # try 1 claimed them, then its worker died
    retry = load_batch(engine, fast(settings), batch, owner=ti)  # try 2, another worker, same owner
    assert retry.counts == {"accepted": 6} and retry.sent == 6
    assert all(r["claimed_by"] is None for r in ledger(engine).values())


def test_a_repeated_id_in_one_run_is_sent_once(engine, settings, sandbox):
    rows = [order_row(1), order_row(2), order_row(1, line=9)]
    summary = load_rows(engine, fast(settings), rows)
    assert summary.counts == {"accepted": 2, "duplicate": 1}
    assert _lgc(sandbox).put_count["ORD-00001"] == 1


def test_two_owners_racing_for_the_same_rows_each_row_goes_to_exactly_one(engine):
    batch = stage_rows(engine, [order_row(i) for i in range(60)])
    items = _items(engine, batch)
    results: dict[str, list] = {}
    barrier = threading.Barrier(2)

    def run(name: str) -> None:
        barrier.wait()
        out = []
        for start in range(0, len(items), 10):  # windows, interleaving with the other owner
            out += lg.claim(engine, items[start:start + 10], owner=name)
        results[name] = out

    owners = [task_owner("d", "r", "load", n) for n in (0, 1)]
    threads = [threading.Thread(target=run, args=(o,)) for o in owners]
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

    batch = stage_rows(engine, [order_row(i) for i in range(120)])
    try:
        load_batch(engine, fast(settings, concurrency=2), batch, progress=progress)
    except RuntimeError as exc:
        assert str(exc) == "boom"
    else:
        raise AssertionError("the error was swallowed")
    left = ledger(engine)
    assert left and all(r["claimed_by"] is None for r in left.values())
    assert {r["state"] for r in left.values()} <= {"accepted", "failed", "pending"}
    boxed = outbox_rows(engine, batch)
    assert not any("credentials" in (r["last_error"] or "") for r in boxed.values())
    assert {r["last_error"] for r in boxed.values() if r["outcome"] == "failed"} <= {
        "not sent: the load stopped on an unexpected error; it goes out on the next run"}
    load_batch(engine, fast(settings), batch)  # the next run finishes the batch
    assert {r["outcome"] for r in outbox_rows(engine, batch).values()} == {"accepted"}
    assert set(_lgc(sandbox).accepted_count.values()) == {1}


def test_a_ledger_state_the_outbox_does_not_name_goes_out_again():
    """A state added to the ledger later (not settled) must not strand its outbox row."""
    assert lg.outbox_outcome("some_new_state", 1, 5) == "failed"
    assert lg.outbox_outcome("some_new_state", 5, 5) == "given_up"
    assert lg.outbox_outcome("unconfirmed", 1, 5) == "unconfirmed"  # named: goes out again
    assert lg.outbox_outcome("unconfirmed", 5, 5) == "given_up"
    assert lg.outbox_outcome("accepted", 1, 5) == "accepted"
