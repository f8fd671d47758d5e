"""labsync on a real CeleryExecutor cluster (tests/e2e/cluster.py), run by its scheduler.

1. Three files dropped in the inbox (good, partly bad, unusable): the scheduler runs
   order_batches on the two Celery workers; the ledger, the reject report, the summaries and the
   file moves are checked, and the run is red because of the unusable file, with `check` saying so.
2. A bigger batch with vendor latency, so the load tasks run a while: one worker is SIGKILLed
   (its whole process tree) while its load tasks are half-way through their rows. The scheduler
   notices the missing heartbeats, Airflow retries those load tasks on the other worker, and the
   batch ends `loaded` with every order created exactly once at LetsGetChecked.

The modules's tests run in order and share the cluster (the second batch follows the first).
`make e2e` prints the last line this module writes: the load tasks each worker ran.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa

from etl.states import BatchStatus, OrderState, OutboxState
from etl.warehouse import batch_files, lgc_orders, lgc_outbox, rejected_rows
from tests.e2e.cluster import REPO, Cluster, wait_until
from tests.helpers import EXAMPLES, seed_row, write_csv

ROOT = Path(os.environ.get("LABSYNC_E2E_DIR", REPO / ".labsync" / "e2e"))
SUMMARY = ROOT.parent / "e2e-summary.txt"
BIG_ROWS = 160  # 4 load tasks of LABSYNC_CHUNK_ROWS=40: two on each worker at once
LATENCY = 1.0  # seconds the sandbox adds to each request: a load task runs ~20 s


@pytest.fixture(scope="module")
def cluster():
    SUMMARY.unlink(missing_ok=True)
    started = time.monotonic()
    with Cluster(ROOT, chunk_rows=40) as c:
        print(f"\ncluster up in {time.monotonic() - started:.0f}s: api-server {c.api_url}, Celery workers "
              f"{', '.join(c.worker_names())}; each component's log: {c.root}/NAME/NAME.log")
        yield c


def failure_of(log: str) -> dict:
    """The exception a task ended with, from its structured (JSON lines) task log."""
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("error_detail"):
            return record["error_detail"][0]
    return {}


def test_the_scheduler_runs_three_files_on_the_celery_workers(cluster):
    for name in ("orders.csv", "orders_broken.csv", "orders_unusable.csv"):
        cluster.drop(EXAMPLES / name, name)
    cluster.trigger("e2e-first")
    assert cluster.wait_run("e2e-first") == "failed"  # on purpose: the unusable file needs a person

    tis = {(t.task_id, t.map_index): t for t in cluster.task_instances("e2e-first")}
    assert {k for k, t in tis.items() if t.state != "success"} == {("check", -1)}
    assert tis[("check", -1)].state == "failed"
    assert {t.hostname for t in tis.values()} <= set(cluster.worker_names())
    why = failure_of(cluster.task_log("e2e-first", "check"))
    assert why.get("exc_type") == "BatchesNeedAttention", why
    assert why["exc_value"].startswith("1 batch(es) need attention: orders_unusable.csv unusable."), why

    engine = cluster.warehouse()
    with engine.connect() as conn:
        states = dict(conn.execute(sa.select(lgc_orders.c.client_order_id, lgc_orders.c.state)).all())
        files = dict(conn.execute(sa.select(batch_files.c.file_name, batch_files.c.status)).all())
        n_rejects = conn.execute(sa.select(sa.func.count()).select_from(rejected_rows)).scalar_one()
    assert len(states) == 12 and set(states.values()) == {OrderState.ACCEPTED}
    assert files == {"orders.csv": BatchStatus.LOADED, "orders_broken.csv": BatchStatus.LOADED,
                     "orders_unusable.csv": BatchStatus.UNUSABLE}
    assert n_rejects == 13
    counts = cluster.sandbox_get("/_sandbox/lgc/counts")
    assert counts["accepted_count"] == {coid: 1 for coid in states}

    assert cluster.inbox_names() == []  # every file moved
    processed = set(cluster.inbox_names("processed"))
    expected = {"orders.csv", "orders.summary.html", "orders_broken.csv", "orders_broken.rejects.csv",
                "orders_broken.summary.html"}
    # labsync since issue 13a also writes the fix file (the rejected rows to correct) beside them
    assert expected <= processed and processed - expected <= {"orders_broken.fix.csv"}, processed
    assert cluster.inbox_names("failed") == ["orders_unusable.csv", "orders_unusable.summary.html"]
    report = cluster.read_inbox("processed/orders_broken.rejects.csv").decode("utf-8-sig")
    assert len(list(csv.DictReader(io.StringIO(report)))) == n_rejects
    print(f"run e2e-first ({cluster.inbox_kind} inbox {cluster.inbox_url}): {len(states)} orders accepted, {n_rejects} rows rejected, files moved; failed on "
          f"purpose, check says: {why['exc_value'].split('. ')[0]}")


def test_a_worker_killed_mid_load_is_retried_on_the_other_and_nothing_is_sent_twice(cluster, tmp_path):
    ids = [f"E2E-{i:04d}" for i in range(1, BIG_ROWS + 1)]
    rows = [seed_row(client_order_id=coid, participant_id=f"P{i:05d}") for i, coid in enumerate(ids, 1)]
    cluster.drop(write_csv(tmp_path / "big.csv", rows), "orders_big.csv")
    cluster.sandbox_post("/_sandbox/lgc/faults", {"latency": LATENCY})
    cluster.trigger("e2e-kill")

    chunks = wait_until("the chunks of the big batch", lambda: cluster.xcom("e2e-kill", "chunks"), 180, 0.5)
    assert len(chunks) == BIG_ROWS // 40
    engine = cluster.warehouse()

    def rows_of(chunk: dict, outcome: str):
        return (sa.select(lgc_outbox.c.client_order_id).where(
            lgc_outbox.c.batch_id == chunk["batch_id"],
            lgc_outbox.c.id.between(chunk["first_id"], chunk["last_id"]),
            lgc_outbox.c.outcome == outcome))

    def sent(chunk: dict) -> int:
        with engine.connect() as conn:
            return len(conn.execute(rows_of(chunk, OutboxState.ACCEPTED)).all())

    def half_way() -> tuple | None:
        """A load task running on a worker, with some of its rows accepted and most still to go."""
        for ti in cluster.task_instances("e2e-kill"):
            if ti.task_id == "load" and ti.state == "running" and ti.hostname:
                done = sent(chunks[ti.map_index])
                if 3 <= done <= chunks[ti.map_index]["rows"] // 2:
                    return ti.hostname, ti.map_index, done
        return None

    victim_host, victim_index, done_before = wait_until("a load task half-way through its rows", half_way, 240, 0.2)
    victim = victim_host.split("@", 1)[0]
    running_there = {t.map_index for t in cluster.task_instances("e2e-kill")
                     if t.task_id == "load" and t.state == "running" and t.hostname == victim_host}
    cluster.kill_worker(victim)
    in_flight = cluster.sandbox_get("/_sandbox/lgc/traffic")["in_flight"]
    done_at_kill = sent(chunks[victim_index])
    # the rows the dead loaders had claimed without a recorded answer: sent or about to be,
    # outcome unknown. Only these may go out again; every other row must be sent exactly once.
    with engine.connect() as conn:
        unknown = {coid for i in running_there
                   for coid in conn.execute(rows_of(chunks[i], OutboxState.PENDING)).scalars()}
    assert 3 <= done_at_kill < chunks[victim_index]["rows"], "the load was not mid-way when its worker died"
    print(f"\nkilled {victim_host} (SIGKILL, whole process tree) while load[{victim_index}] had "
          f"{done_at_kill}/{chunks[victim_index]['rows']} rows accepted; its running loads: {sorted(running_there)}; "
          f"PUTs in flight then: {in_flight}; rows claimed with no answer recorded: {len(unknown)}")

    assert cluster.wait_run("e2e-kill", timeout=300) == "success"
    tis = {(t.task_id, t.map_index): t for t in cluster.task_instances("e2e-kill")}
    assert {k: t.state for k, t in tis.items() if t.state != "success"} == {}
    survivor = next(n for n in cluster.worker_names() if n != victim_host)
    for index in running_there:  # each killed load was retried, and the retry ran on the survivor
        ti = tis[("load", index)]
        assert ti.try_number >= 2 and ti.hostname == survivor, ti
        earlier = [t for t in cluster.tries("load", "e2e-kill") if t.map_index == index and t.try_number < ti.try_number]
        assert [t.hostname for t in earlier] == [victim_host], earlier

    with engine.connect() as conn:
        status = conn.execute(sa.select(batch_files.c.status).where(batch_files.c.file_name == "orders_big.csv")).scalar_one()
        states = dict(conn.execute(sa.select(lgc_orders.c.client_order_id, lgc_orders.c.state)
                                   .where(lgc_orders.c.client_order_id.in_(ids))).all())
        outcomes = Counter(conn.execute(sa.select(lgc_outbox.c.outcome).join(
            batch_files, batch_files.c.id == lgc_outbox.c.batch_id).where(
            batch_files.c.file_name == "orders_big.csv")).scalars())
    assert status == BatchStatus.LOADED
    assert states == {coid: OrderState.ACCEPTED for coid in ids}
    assert outcomes == {OutboxState.ACCEPTED: BIG_ROWS}
    counts = cluster.sandbox_get("/_sandbox/lgc/counts")
    assert {coid: counts["accepted_count"].get(coid) for coid in ids} == {coid: 1 for coid in ids}
    # a PUT whose answer the dead worker never recorded went again (PUT is idempotent: the same
    # order back, nothing created); every other order was sent exactly once
    puts = {coid: counts["put_count"][coid] for coid in ids}
    again = {coid: n for coid, n in puts.items() if n != 1}
    assert set(again) <= unknown and set(again.values()) <= {2}, (again, unknown)
    resent = sum(again.values()) - len(again)
    assert "orders_big.summary.html" in cluster.inbox_names("processed")

    per_worker = Counter(t.hostname for t in cluster.tries("load"))
    assert set(per_worker) == set(cluster.worker_names())
    line = "load tasks per worker: " + ", ".join(f"{h} {per_worker[h]}" for h in cluster.worker_names())
    print(f"{BIG_ROWS} orders created once each at LetsGetChecked; {resent} PUT(s) the dead worker had "
          f"not recorded went again (idempotent), every other order was sent once")
    print(line)
    SUMMARY.write_text(line + "\n")
