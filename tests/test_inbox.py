"""The inbox pipeline without Airflow (prepare -> load_chunk -> finish), against the sandbox over
real HTTP, on SQLite and PostgreSQL: outcomes, file moves, summaries, exactly-once by content."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa

from etl import warehouse
from etl.batches import inbox
from etl.cli import main
from etl.warehouse import batch_files, lgc_orders, rejected_rows
from tests.helpers import EXAMPLES, seed_row, write_csv


@pytest.fixture
def box(settings):
    settings = replace(settings, inbox_settle_seconds=0.0, chunk_rows=4)
    paths = inbox.InboxPaths(Path(settings.inbox)).ensure()
    return settings, paths, warehouse.connect(settings.warehouse_url)


def drop(paths, *names) -> None:
    for name in names:
        shutil.copy(EXAMPLES / name, paths.root / name)


def ledger(engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(lgc_orders.c.client_order_id, lgc_orders.c.state)).all())


def test_good_partly_bad_and_unusable_files(box, sandbox):
    settings, paths, engine = box
    drop(paths, "orders.csv", "orders_broken.csv", "orders_unusable.csv")
    outcomes = {o["name"]: o for o in inbox.run_once(engine, settings)}

    assert outcomes["orders.csv"]["counts"]["accepted"] == 10
    assert outcomes["orders_broken.csv"]["counts"] == {"accepted": 2, "rejected before sending": 6}
    assert outcomes["orders_unusable.csv"]["status"] == "unusable"
    # 10 + 2 orders, each sent once; chunk_rows=4 split the good file over 3 chunks
    assert len(sandbox.sandbox.lgc.orders) == 12 and set(sandbox.sandbox.lgc.accepted_count.values()) == {1}
    assert set(ledger(engine).values()) == {"accepted"} and len(ledger(engine)) == 12

    assert sorted(p.name for p in paths.processed.iterdir()) == [
        "orders.csv", "orders.summary.html", "orders_broken.csv", "orders_broken.rejects.csv",
        "orders_broken.summary.html"]
    assert sorted(p.name for p in paths.failed.iterdir()) == ["orders_unusable.csv", "orders_unusable.summary.html"]
    assert [p.name for p in paths.root.iterdir() if p.is_file()] == []
    assert list(paths.work.iterdir()) == []  # staged chunks cleaned up

    page = (paths.processed / "orders_broken.summary.html").read_text()
    assert "already appears on line 2" in page and "BROKEN-0008" in page and "Rejected rows" in page
    ids = sandbox.sandbox.lgc.orders["BROKEN-0008"]["response"]["orderItems"]
    assert all(item["id"] in page for item in ids)
    assert "comma-separated" in (paths.failed / "orders_unusable.summary.html").read_text()
    with engine.connect() as conn:
        statuses = dict(conn.execute(sa.select(batch_files.c.file_name, batch_files.c.status)).all())
        n_rejects = conn.execute(sa.select(sa.func.count()).select_from(rejected_rows)).scalar_one()
    assert statuses == {"orders.csv": "loaded", "orders_broken.csv": "loaded", "orders_unusable.csv": "unusable"}
    assert n_rejects == 13


def test_second_run_and_redropped_copy_send_nothing(box, sandbox):
    settings, paths, engine = box
    drop(paths, "orders.csv")
    inbox.run_once(engine, settings)
    puts = sum(sandbox.sandbox.lgc.put_count.values())

    assert inbox.run_once(engine, settings) == []  # empty inbox
    shutil.copy(EXAMPLES / "orders.csv", paths.root / "renamed copy.csv")
    (outcome,) = inbox.run_once(engine, settings)
    assert outcome["status"] == "duplicate"
    assert sum(sandbox.sandbox.lgc.put_count.values()) == puts
    assert "Already processed" in (paths.processed / "renamed copy.summary.html").read_text()


def test_redropping_a_batch_with_failed_rows_resends_only_those(box, sandbox):
    settings, paths, engine = box
    lgc = sandbox.sandbox.lgc
    lgc.forced["DEMO-2026-0003"] = 503  # retried until the budget is spent -> failed
    drop(paths, "orders.csv")
    (first,) = inbox.run_once(engine, settings)
    assert first["counts"] == {"accepted": 9, "failed": 1, "rejected before sending": 0}
    assert "Orders that did not go through" in (paths.processed / "orders.summary.html").read_text()

    lgc.forced.clear()
    before = dict(lgc.put_count)
    shutil.copy(EXAMPLES / "orders.csv", paths.root / "orders.csv")
    (second,) = inbox.run_once(engine, settings)
    sent_again = {k for k, v in lgc.put_count.items() if v != before.get(k)}
    assert sent_again == {"DEMO-2026-0003"}
    assert second["counts"]["accepted"] == 10 and "failed" not in second["counts"]
    assert ledger(engine)["DEMO-2026-0003"] == "accepted"
    assert (paths.processed / "orders.2.csv").exists()  # the earlier file is never overwritten


def test_an_interrupted_run_is_completed_by_the_next_without_duplicates(box, sandbox):
    settings, paths, engine = box
    drop(paths, "orders.csv")
    prepared = inbox.prepare(engine, settings)
    inbox.load_chunk(engine, settings, prepared["chunks"][0])  # then the worker "dies"
    assert (paths.processing / "orders.csv").exists()

    (outcome,) = inbox.run_once(engine, settings)
    assert outcome["status"] == "loaded" and outcome["counts"]["accepted"] == 10
    assert set(sandbox.sandbox.lgc.accepted_count.values()) == {1}
    assert len(sandbox.sandbox.lgc.orders) == 10


def test_a_file_still_being_written_waits_for_the_next_run(box, sandbox):
    settings, paths, engine = box
    drop(paths, "orders.csv")
    assert inbox.prepare(engine, replace(settings, inbox_settle_seconds=60))["batches"] == []
    old = time.time() - 120
    os.utime(paths.root / "orders.csv", (old, old))
    assert len(inbox.prepare(engine, replace(settings, inbox_settle_seconds=60))["batches"]) == 1


def test_cli_inbox_exit_codes(box, sandbox, monkeypatch, capsys):
    settings, paths, engine = box
    monkeypatch.setenv("LABSYNC_WAREHOUSE_URL", settings.warehouse_url)
    monkeypatch.setenv("LGC_BASE_URL", settings.lgc.base_url)
    monkeypatch.setenv("LABSYNC_INBOX_SETTLE_SECONDS", "0")
    write_csv(paths.root / "one.csv", [seed_row(client_order_id="CLI-1")])
    assert main(["inbox", "--folder", str(paths.root)]) == 0
    drop(paths, "orders_broken.csv")
    assert main(["inbox", "--folder", str(paths.root)]) == 1
    out = capsys.readouterr().out
    assert "one.csv: loaded (accepted 1)" in out and "orders_broken.csv: loaded (accepted 2, rejected before sending 6)" in out
    assert main(["batches"]) == 0
    assert "orders_broken.csv" in capsys.readouterr().out


def test_rows_of_a_load_task_that_died_are_sent_when_the_file_is_dropped_again(box, sandbox):
    """The DAG's finish runs even when a load task failed for good (vendor down longer than the
    task's retries). Those rows never reached the ledger: the summary must say so, and dropping
    the file again must send them, not call the file 'already processed'."""
    settings, paths, engine = box
    drop(paths, "orders.csv")
    prepared = inbox.prepare(engine, settings)
    (outcome,) = inbox.finish(engine, settings, prepared, [None] * len(prepared["chunks"]))
    assert outcome["counts"]["pending"] == 10 and outcome["status"] == "incomplete"
    assert "drop the file again to retry" in (paths.processed / "orders.summary.html").read_text()
    assert sandbox.sandbox.lgc.orders == {}

    shutil.copy(EXAMPLES / "orders.csv", paths.root / "orders.csv")
    (again,) = inbox.run_once(engine, settings)
    assert again["status"] == "loaded" and again["counts"]["accepted"] == 10
    assert len(sandbox.sandbox.lgc.orders) == 10


def test_cli_inbox_with_the_vendor_down_keeps_the_file_for_the_next_run(box, sandbox, monkeypatch, capsys):
    settings, paths, engine = box
    monkeypatch.setenv("LABSYNC_WAREHOUSE_URL", settings.warehouse_url)
    monkeypatch.setenv("LGC_BASE_URL", settings.lgc.base_url)
    monkeypatch.setenv("LABSYNC_INBOX_SETTLE_SECONDS", "0")
    monkeypatch.setenv("LABSYNC_RETRY_INITIAL_WAIT", "0.01")
    monkeypatch.setenv("LABSYNC_RETRY_ATTEMPTS", "3")
    drop(paths, "orders.csv")
    sandbox.sandbox.lgc.faults.update(script=[503] * 3)  # the token endpoint fails every try
    assert main(["inbox", "--folder", str(paths.root)]) == 1
    err = capsys.readouterr().err
    assert "the next run processes them" in err and "Traceback" not in err
    assert (paths.processing / "orders.csv").exists() and sandbox.sandbox.lgc.orders == {}

    assert main(["inbox", "--folder", str(paths.root)]) == 0  # the vendor is back
    assert len(sandbox.sandbox.lgc.orders) == 10 and (paths.processed / "orders.csv").exists()
