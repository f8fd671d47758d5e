"""Failures that must not lose or duplicate an order (SQLite and PostgreSQL):
- a storm of 500/503, 429 with Retry-After and connections dropped after the order was stored;
- `labsync load` killed with SIGKILL at random moments, 20 times, then rerun;
- two loaders sending the same rows at the same time."""

from __future__ import annotations

import signal
import subprocess
import threading

import sqlalchemy as sa

from etl.orders.load import load_rows
from etl.settings import RetrySettings
from etl.warehouse import batch_files
from tests.pgserver import wait_for
from tests.test_lgc_support import (
    LABSYNC,
    cli_env,
    csv_row,
    fast,
    ledger,
    load_batch,
    order_row,
    outbox_rows,
    stage_rows,
    write_csv,
)


def _lgc(sandbox):
    return sandbox.sandbox.lgc


def _assert_one_order_per_accepted_id(engine, lgc, expected: int) -> None:
    rows = ledger(engine)
    assert len(rows) == expected
    assert {r["state"] for r in rows.values()} == {"accepted"}
    assert all(r["claimed_by"] is None for r in rows.values())
    assert set(lgc.orders) == set(rows)  # exactly the accepted ids, nothing more
    assert set(lgc.accepted_count.values()) == {1}  # none created twice
    for coid, row in rows.items():  # the ledger holds the ids of the one order LGC has
        assert row["order_item_ids"] == lgc.orders[coid]["response"]["orderItems"]


def test_a_storm_of_faults_ends_with_every_row_accepted_once(engine, settings, sandbox):
    lgc = _lgc(sandbox)
    lgc.faults.update(error_rate=0.15, throttle_rate=0.1, drop_rate=0.1, retry_after=0.01, seed=7)
    retry = RetrySettings(max_attempts=12, initial_wait=0.005, max_wait=0.02, timeout=5)
    rows = [order_row(i) for i in range(150)]
    summary = load_rows(engine, fast(settings, concurrency=8, retry=retry), rows)
    assert summary.counts == {"accepted": 150}, summary.as_dict()
    injected = lgc.faults.injected
    assert injected["errors"] > 10 and injected["throttled"] > 5 and injected["dropped"] > 5
    assert summary.requests > 150
    _assert_one_order_per_accepted_id(engine, lgc, 150)
    # orders whose connection was dropped after they were stored were sent again, and the
    # sandbox answered with the same order instead of creating a second one
    assert any(n > 1 for n in lgc.put_count.values())


def _load_cmd(path):
    return [*LABSYNC, "load", str(path)]


def test_a_loader_killed_at_random_moments_loses_nothing_and_sends_nothing_twice(
        engine, settings, sandbox, tmp_path, warehouse_url):
    """SIGKILL `labsync load` at random moments (while it imports, validates, writes the outbox,
    sends, records, finishes), 20 times on PostgreSQL (5 on SQLite), rerunning it each time; then
    rerun until it exits 0. Every row ends accepted, none is left unsettled or claimed, and no
    order is created twice at LetsGetChecked. A short lease lets each rerun take over at once."""
    import random

    lgc = _lgc(sandbox)
    lgc.faults.update(latency=0.02)
    n = 1000
    kills_wanted = 20 if warehouse_url.startswith("postgresql") else 5
    path = write_csv(tmp_path / "orders.csv", [csv_row(i) for i in range(n)])
    env = cli_env(fast(settings, concurrency=4), LABSYNC_LEASE_SECONDS="1", LABSYNC_HEARTBEAT_SECONDS="0.25")
    rng = random.Random(20261124)

    def accepted() -> int:
        return sum(1 for r in ledger(engine).values() if r["state"] == "accepted")

    kills, mid_load, exits = 0, 0, []
    for _ in range(kills_wanted * 4):
        if kills == kills_wanted:
            break
        puts, done = sum(lgc.put_count.values()), accepted()
        worker = subprocess.Popen(_load_cmd(path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # a random moment: any time after the start (importing, validating, writing the outbox,
        # sending...), after k more PUTs left, or after k more outcomes were recorded
        moment, k = rng.choice(("time", "puts", "recorded")), rng.randint(1, 40)
        if moment == "time":
            wait_for(lambda w=worker: w.poll() is not None, timeout=rng.uniform(0.3, 3.0), interval=0.01)
        elif moment == "puts":
            wait_for(lambda w=worker, t=puts + k: w.poll() is not None or sum(lgc.put_count.values()) >= t,
                     timeout=120, interval=0.002)
        else:
            wait_for(lambda w=worker, t=done + k: w.poll() is not None or accepted() >= t,
                     timeout=120, interval=0.01)
        if worker.poll() is None:
            worker.send_signal(signal.SIGKILL)
            kills += 1
            mid_load += sum(lgc.put_count.values()) > puts
        worker.communicate()
        exits.append(worker.returncode)
    assert kills == kills_wanted, f"only {kills} kills landed (exit codes {exits})"
    assert mid_load >= kills_wanted // 3, "too few kills landed while orders were being sent"
    assert accepted() < n, "the kills came too late: the batch was done before the last one"
    for _ in range(20):  # reruns until the batch is done (a rerun may find the dead run's claim live)
        rerun = subprocess.run(_load_cmd(path), env=env, capture_output=True, text=True, timeout=180)
        if rerun.returncode == 0:
            break
        assert rerun.returncode == 1 and "Traceback" not in rerun.stderr, rerun.stderr
        wait_for(lambda: False, timeout=0.5)  # the dead run's lease runs out
    assert rerun.returncode == 0, rerun.stderr
    _assert_one_order_per_accepted_id(engine, lgc, n)
    boxed = outbox_rows(engine)
    assert len(boxed) == n and {r["outcome"] for r in boxed.values()} == {"accepted"}  # 0 lost, 0 open
    assert all(r["body"] is None for r in boxed.values())
    with engine.connect() as conn:
        claims = conn.execute(sa.select(sa.func.count()).select_from(batch_files)
                              .where(batch_files.c.claimed_by.is_not(None))).scalar_one()
        status = conn.execute(sa.select(batch_files.c.status)).scalars().all()
    assert claims == 0 and status == ["loaded"]
    assert max(lgc.accepted_count.values()) == 1


def test_two_loaders_on_the_same_rows_send_each_order_once(engine, settings, sandbox):
    """Two task instances loading the same chunk at once (as a zombie and its retry might),
    each with its own event loop, owner and connections: the claims in the ledger decide who
    sends what."""
    lgc = _lgc(sandbox)
    lgc.faults.update(latency=0.02)
    n = 200
    batch = stage_rows(engine, [order_row(i) for i in range(n)])
    summaries: list = []
    barrier = threading.Barrier(2)

    def run(owner: str) -> None:
        barrier.wait()
        summaries.append(load_batch(engine, fast(settings, concurrency=4), batch, owner=owner))

    threads = [threading.Thread(target=run, args=(f"ti:order_batches/r/load/{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(summaries) == 2
    assert sum(s.sent for s in summaries) == n
    assert sum(lgc.put_count.values()) == n and set(lgc.put_count.values()) == {1}
    for s in summaries:  # a row is sent by one loader, held by the other (busy) or already settled
        assert set(s.counts) <= {"accepted", "busy"}
    _assert_one_order_per_accepted_id(engine, lgc, n)
    assert {r["outcome"] for r in outbox_rows(engine, batch).values()} == {"accepted"}
