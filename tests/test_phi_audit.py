"""The audit trail (issue 23, point 3): every command that shows or writes PHI adds a row naming
who acted (the OS user for the CLI, the task instance for Airflow, the remote address for the
receiver), what, which subjects (ids only) and how many; `labsync audit --json` filters it.
The Airflow actor is shown under dag.test() in tests/test_purge.py (the retention DAG)."""

from __future__ import annotations

import getpass
import json
import os
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from etl import audit
from etl.states import AuditAction
from etl.warehouse.tables import phi_access
from tests.lifecycle_support import run
from tests.test_lgc_support import csv_row, write_csv

__all__ = ["run"]  # the in-process CLI fixture

PLANTED_NAME = "Zebulonova"  # a patient's last name: must never reach the trail




def _rows(engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(phi_access).order_by(phi_access.c.id)).mappings()]


def _new(engine, before: int) -> list[dict]:
    return [r for r in _rows(engine) if r["id"] > before]


def _last_id(engine) -> int:
    rows = _rows(engine)
    return rows[-1]["id"] if rows else 0


def test_cli_commands_record_who_what_and_which_orders(run, engine, tmp_path):
    me = f"cli:{getpass.getuser()}"
    records = [csv_row(i, last_name=PLANTED_NAME) for i in range(4)]
    records[1]["dob"] = "1985-02-30"  # rejected: a report and a fix file are written beside the file
    path = write_csv(tmp_path / "batch1.csv", records)

    code, _, err = run("load", str(path))
    assert code == 1, err
    assert (tmp_path / "batch1.rejects.csv").exists() and (tmp_path / "batch1.fix.csv").exists()
    [reports] = _rows(engine)
    assert reports["actor"] == me and reports["action"] == AuditAction.REPORT_WRITTEN
    assert reports["subject_kind"] == "batch" and reports["record_count"] == 1
    assert reports["detail"] == "batch1.rejects.csv, batch1.fix.csv"
    batch_id = reports["subject_ids"][0]

    before = _last_id(engine)
    assert run("status", "ORD-00002", "--json")[0] == 0
    [shown] = _new(engine, before)
    assert (shown["actor"], shown["action"], shown["subject_kind"], shown["subject_ids"], shown["record_count"]) == (
        me, AuditAction.ORDER_STATUS_SHOWN, "order", ["ORD-00002"], 1)

    before = _last_id(engine)
    assert run("status", "--batch", "batch1.csv")[0] == 0
    [batch] = _new(engine, before)
    assert batch["action"] == AuditAction.BATCH_STATUS_SHOWN and batch["actor"] == me
    assert sorted(batch["subject_ids"]) == ["ORD-00000", "ORD-00002", "ORD-00003"]  # the rows it showed
    assert batch["record_count"] == 3 and batch["detail"] == f"batch {batch_id}"

    before = _last_id(engine)
    assert run("status")[0] == 0  # counts only: no PHI shown, nothing recorded
    assert run("status", "NOPE")[0] == 1  # nothing shown
    assert _new(engine, before) == []

    before = _last_id(engine)
    dry = write_csv(tmp_path / "batch2.csv", [csv_row(i, last_name=PLANTED_NAME) for i in range(10, 13)])
    code, _, err = run("load", str(dry), "--dry-run")
    assert code == 0, err
    [written] = _new(engine, before)
    assert written["action"] == AuditAction.DRY_RUN_WRITTEN and written["actor"] == me
    assert written["subject_ids"] == ["ORD-00010", "ORD-00011", "ORD-00012"] and written["record_count"] == 3
    assert written["detail"] == "batch2.requests.jsonl"

    before = _last_id(engine)
    bad = write_csv(tmp_path / "batch3.csv", [csv_row(20), csv_row(21, dob="not a date")])
    assert run("validate", str(bad), "--record")[0] == 1
    [validated] = _new(engine, before)
    assert validated["action"] == AuditAction.REPORT_WRITTEN and validated["record_count"] == 1
    assert validated["detail"] == "batch3.rejects.csv, batch3.fix.csv"

    # ids only: no planted name, date of birth or other cell anywhere in the trail
    text = json.dumps(_rows(engine), default=str)
    assert PLANTED_NAME not in text and "1985-02-30" not in text


def test_the_inbox_records_its_reports_and_summaries(run, engine, tmp_path, monkeypatch):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rows = [csv_row(i) for i in range(3)]
    rows[2]["dob"] = "not a date"
    write_csv(inbox / "orders.csv", rows)
    monkeypatch.setenv("LABSYNC_INBOX_SETTLE_SECONDS", "0")
    code, out, err = run("inbox", "--folder", str(inbox))
    assert code == 1, out + err  # one row rejected
    got = {(r["action"], r["detail"]) for r in _rows(engine)}
    assert (AuditAction.REPORT_WRITTEN, "orders.fix.csv, orders.rejects.csv") in got
    assert (AuditAction.REPORT_WRITTEN, "processed/orders.summary.html") in got  # beside the moved file
    assert {r["actor"] for r in _rows(engine)} == {f"cli:{getpass.getuser()}"}


def test_audit_json_filters_by_since_who_and_order(run, engine):
    now = datetime.now(UTC)
    audit.record(engine, AuditAction.ORDER_STATUS_SHOWN, "order", ["ORD-1"], 1, who="cli:alice",
                 at=now - timedelta(days=10))
    audit.record(engine, AuditAction.BATCH_STATUS_SHOWN, "order", ["ORD-1", "ORD-2"], 2, who="cli:bob",
                 at=now - timedelta(days=2))
    audit.record(engine, AuditAction.ORDER_STATUS_SHOWN, "order", ["ORD-10"], 1, who="airflow:d.t.r.1",
                 at=now - timedelta(hours=1))

    def rows(*args: str) -> list[dict]:
        code, out, err = run("audit", "--json", *args)
        assert code == 0, err
        return json.loads(out)["rows"]

    assert [r["actor"] for r in rows()] == ["cli:alice", "cli:bob", "airflow:d.t.r.1"]  # oldest first
    assert [r["actor"] for r in rows("--who", "bob")] == ["cli:bob"]
    assert [r["actor"] for r in rows("--who", "airflow:")] == ["airflow:d.t.r.1"]
    # ORD-1 exactly: not ORD-10, which merely starts with it
    assert [r["actor"] for r in rows("--order", "ORD-1")] == ["cli:alice", "cli:bob"]
    assert [r["actor"] for r in rows("--since", "5d")] == ["cli:bob", "airflow:d.t.r.1"]
    since = (now - timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert [r["actor"] for r in rows("--since", since, "--order", "ORD-1")] == ["cli:bob"]
    first = rows("--who", "alice")[0]
    assert first["subject_ids"] == ["ORD-1"] and first["at"].endswith("Z")
    assert run("audit", "--since", "yesterday")[0] == 2  # a usage error, not a traceback
    code, out, _ = run("audit", "--who", "bob")
    assert code == 0 and "cli:bob" in out and "1 row" in out


def test_the_receiver_records_the_remote_address(engine):
    from etl.webhooks.store import store_event

    event_id, _ = store_event(engine, "lgc", b'{"event": "order"}', event_type="order")
    audit.record_receipt(engine, "203.0.113.9", "lgc", event_id)
    [row] = _rows(engine)
    assert row["actor"] == "receiver:203.0.113.9" and row["action"] == AuditAction.WEBHOOK_RECEIVED
    assert row["subject_kind"] == "webhook_event" and row["subject_ids"] == [str(event_id)]
    assert row["detail"] == "lgc" and row["record_count"] == 1


def test_the_real_receiver_records_each_delivery_it_stores(engine):
    """Over HTTP: each stored delivery (a repeat too) adds a row naming the sender's address; a
    refused one adds none."""
    import httpx

    from etl.asgi import BackgroundServer
    from etl.settings import WebhookSettings
    from etl.webhooks.app import build_app

    body = b'{"type": "order", "body": {"clientOrderId": "ORD-1"}}'
    with BackgroundServer(build_app(engine, WebhookSettings(rupa_secret="s"))) as rx:
        assert httpx.post(f"{rx.url}/webhooks/lgc", content=body).status_code == 200
        assert httpx.post(f"{rx.url}/webhooks/lgc", content=body).json()["duplicate"] is True
        assert httpx.post(f"{rx.url}/webhooks/rupa", content=body).status_code == 401  # unsigned: refused
    rows = _rows(engine)
    assert [(r["actor"], r["action"], r["detail"]) for r in rows] == [
        ("receiver:127.0.0.1", AuditAction.WEBHOOK_RECEIVED, "lgc")] * 2
    assert rows[0]["subject_ids"] == rows[1]["subject_ids"]  # the same stored event


def test_who_acts(monkeypatch):
    assert audit.actor() == f"cli:{getpass.getuser()}"
    assert audit.airflow_actor("labsync_retention", "purge", "manual__2026", 2) == \
        "airflow:labsync_retention.purge.manual__2026.2"
    assert audit.airflow_actor("order_batches", "load", "r", 1, map_index=3) == "airflow:order_batches.load[3].r.1"
    audit.set_process_actor("airflow:d.t.r.1")
    try:
        assert audit.actor() == "airflow:d.t.r.1"
        with audit.acting_as("receiver:127.0.0.1"):
            assert audit.actor() == "receiver:127.0.0.1"
        assert audit.actor() == "airflow:d.t.r.1"
    finally:
        audit.set_process_actor(None)

    def no_user():
        raise KeyError("no passwd entry")

    monkeypatch.setattr(getpass, "getuser", no_user)
    assert audit.actor() == f"cli:uid:{os.getuid()}"


def test_results_stored_are_recorded_by_order(engine):
    from etl.warehouse.tables import lgc_results, rupa_results

    start = datetime.now(UTC)
    assert audit.record_results(engine, start) is None  # nothing stored: nothing recorded
    with engine.begin() as conn:
        conn.execute(sa.insert(lgc_results).values(
            barcode="B1", item_id="I1", client_order_id="ORD-7", json_body=b"{}", json_sha256="0" * 64,
            fetched_at=start + timedelta(seconds=1), value_count=0))
        conn.execute(sa.insert(lgc_results).values(  # stored before the run: not this run's
            barcode="B0", item_id="I0", client_order_id="ORD-6", json_body=b"{}", json_sha256="1" * 64,
            fetched_at=start - timedelta(days=1), value_count=0))
        conn.execute(sa.insert(rupa_results).values(
            ordered_test_id="ordts_1", order_id="ord_1", kind="pdf", sha256="2" * 64, size=1, content=b"x",
            stored_at=start + timedelta(seconds=1)))
    audit.record_results(engine, start)
    [row] = _rows(engine)
    assert row["action"] == AuditAction.RESULTS_STORED and sorted(row["subject_ids"]) == ["ORD-7", "ord_1"]
    assert row["record_count"] == 2
