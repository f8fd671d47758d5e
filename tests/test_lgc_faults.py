"""Failures that must not lose or duplicate an order (SQLite and PostgreSQL):
- a storm of 500/503, 429 with Retry-After and connections dropped after the order was stored;
- a `labsync load` worker killed with SIGKILL mid-batch, then rerun;
- two loaders sending the same rows at the same time."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

from etl.lgc.load import load_rows
from etl.settings import RetrySettings
from tests.pgserver import wait_for
from tests.test_lgc_support import LABSYNC, cli_env, csv_row, fast, ledger, order_row, write_csv


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


def test_a_worker_killed_mid_batch_and_rerun_sends_no_order_twice(engine, settings, sandbox, tmp_path):
    lgc = _lgc(sandbox)
    lgc.faults.update(latency=0.04)
    n = 120
    path = write_csv(tmp_path / "orders.csv", [csv_row(i) for i in range(n)])
    env = cli_env(fast(settings, concurrency=4))
    worker = subprocess.Popen(_load_cmd(path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: sum(lgc.put_count.values()) >= 30, timeout=60, interval=0.005)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.communicate()
    assert worker.returncode == -signal.SIGKILL
    time.sleep(0.2)  # let requests the dead worker left in flight reach the sandbox
    after_kill = ledger(engine)
    states = [r["state"] for r in after_kill.values()]
    assert states.count("accepted") < n, "the kill came too late to be mid-batch"
    assert states.count("pending") >= 1, "a killed worker leaves pending rows behind"

    rerun = subprocess.run(_load_cmd(path), env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"accepted {n}" in rerun.stdout
    _assert_one_order_per_accepted_id(engine, lgc, n)
    # the pending rows were sent again; the sandbox gave back the order it already had
    resent = [c for c, r in after_kill.items() if r["state"] == "pending" and lgc.put_count[c] > 1]
    assert resent


def test_two_loaders_on_the_same_rows_send_each_order_once(engine, settings, sandbox):
    """Two runs at once (as parallel DAG tasks would be), each with its own event loop, claim
    id and connections: the claims in the ledger decide who sends what."""
    lgc = _lgc(sandbox)
    lgc.faults.update(latency=0.02)
    n = 200
    rows = [order_row(i) for i in range(n)]
    summaries: list = []
    barrier = threading.Barrier(2)

    def run() -> None:
        barrier.wait()
        summaries.append(load_rows(engine, fast(settings, concurrency=4), rows))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(summaries) == 2
    assert sum(s.sent for s in summaries) == n
    assert sum(lgc.put_count.values()) == n and set(lgc.put_count.values()) == {1}
    # every row is accounted for by each run: sent by it, held by the other (busy), or settled
    for s in summaries:
        assert s.rows == n and set(s.counts) <= {"accepted", "busy"}
    _assert_one_order_per_accepted_id(engine, lgc, n)
