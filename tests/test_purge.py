"""Retention and purge (issue 23, point 4): `labsync purge --dry-run` says what would go by class
and changes nothing; `labsync purge` then removes exactly the expired items of each class and
nothing still needed (items planted a day inside and a day outside each retention, and needed
ones far older); the files go through the inbox's store (a local folder and an S3 server); each
class purged adds an audit row; the labsync_retention DAG does the same under dag.test()."""

from __future__ import annotations

import getpass
import json
import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from etl import audit, cli, retention
from etl.errors import ConfigError
from etl.settings import RetentionSettings, Settings
from etl.states import AuditAction
from etl.warehouse.tables import (
    batch_files,
    lgc_outbox,
    lgc_result_values,
    lgc_results,
    phi_access,
    rejected_rows,
    rupa_ordered_tests,
    rupa_results,
    webhook_events,
)

DAY = timedelta(days=1)
R = RetentionSettings()  # the defaults: every item is planted relative to them


def _insert(conn, table, **values) -> int:
    return conn.execute(sa.insert(table).values(**values).returning(*table.primary_key.columns)).scalar_one()


def plant(engine, now: datetime) -> dict:
    """One item a day outside (`old`) and a day inside (`new`) each class's retention, and items
    still needed although far older. Returns their keys by name."""
    k: dict = {}
    with engine.begin() as conn:
        def batch(name, status, processed, **kw):
            return _insert(conn, batch_files, file_name=f"{name}.csv", sha256=name.ljust(64, "0"), status=status,
                           received_at=processed - DAY, processed_at=processed, stored_as=f"processed/{name}.csv", **kw)

        old_rej = now - (R.rejected_values + 1) * DAY
        k["b_old"] = batch("old", "loaded", old_rej)
        k["b_new"] = batch("new", "loaded", now - (R.rejected_values - 1) * DAY)
        k["b_incomplete"] = batch("incomplete", "incomplete", now - 400 * DAY)  # rows still to send
        k["b_unusable"] = batch("bad", "unusable", old_rej)
        for name in ("b_old", "b_new", "b_incomplete", "b_unusable"):
            k[f"rej_{name}"] = _insert(conn, rejected_rows, batch_id=k[name], line=2, column_name="dob",
                                       value="1985-02-30", reason="dob is not a date")

        old_out, new_out = now - (R.outbox_bodies + 1) * DAY, now - (R.outbox_bodies - 1) * DAY
        for name, outcome, at in (("out_old", "accepted", old_out), ("out_new", "accepted", new_out),
                                  ("out_failed", "failed", now - 400 * DAY), ("out_given_up", "given_up", old_out),
                                  ("out_pending", "pending", old_out)):
            k[name] = _insert(conn, lgc_outbox, batch_id=k["b_old"], client_order_id=name, body='{"x": 1}',
                              body_sha256="0" * 64, outcome=outcome, attempts=1, created_at=at, updated_at=at)

        old_ev, new_ev = now - (R.webhook_bodies + 1) * DAY, now - (R.webhook_bodies - 1) * DAY
        for name, state, at, auth in (("ev_old", "applied", old_ev, True), ("ev_new", "applied", new_ev, True),
                                      ("ev_received", "received", now - 400 * DAY, True),
                                      ("ev_failed", "failed", now - 400 * DAY, True),
                                      ("ev_ignored_auth", "ignored", old_ev, True),
                                      ("ev_ignored_unauth", "ignored", old_ev, False)):
            k[name] = _insert(conn, webhook_events, source="lgc", sha256=name.ljust(64, "0"), body=b'{"name": "x"}',
                              received_at=at, applied_at=at if state == "applied" else None, deliveries=1,
                              state=state, attempts=1, authenticated=auth)

        old_res, new_res = now - (R.result_documents + 1) * DAY, now - (R.result_documents - 1) * DAY
        for name, at, hl7 in (("res_old", old_res, b"MSH|"), ("res_new", new_res, b"MSH|"),
                              ("res_no_hl7", now - 800 * DAY, None)):  # its HL7 is still to fetch
            _insert(conn, lgc_results, barcode=name, item_id=f"i_{name}", client_order_id=f"o_{name}",
                    json_body=b'{"testResults": []}', json_sha256="0" * 64, hl7_body=hl7,
                    hl7_sha256="1" * 64 if hl7 else None, fetched_at=at, hl7_fetched_at=at if hl7 else None,
                    value_count=1)
            _insert(conn, lgc_result_values, barcode=name, position=0, biomarker_name="HIV", value="Reactive")
        for name, pending in (("t_done", 0), ("t_pending", 1)):
            _insert(conn, rupa_ordered_tests, id=name, order_id="ord_1", results_pending=pending, results_attempts=1,
                    event_created_at=old_res, first_seen_at=old_res, updated_at=old_res)
        for name, test, kind, at in (("rupa_old", "t_done", "pdf", old_res), ("rupa_new", "t_done", "hl7", new_res),
                                     ("rupa_pending", "t_pending", "pdf", old_res)):
            k[name] = _insert(conn, rupa_results, ordered_test_id=test, order_id="ord_1", kind=kind,
                              sha256="2" * 64, size=3, content=b"PDF", stored_at=at)

    k["audit_old"] = audit.record(engine, AuditAction.ORDER_STATUS_SHOWN, "order", ["ORD-1"], 1, who="cli:x",
                                  at=now - (R.audit + 1) * DAY)
    k["audit_new"] = audit.record(engine, AuditAction.ORDER_STATUS_SHOWN, "order", ["ORD-2"], 1, who="cli:x",
                                  at=now - (R.audit - 1) * DAY)
    return k


FILES_OLD = ["processed/old.csv", "processed/old.summary.html", "processed/old.fix.csv",
             "failed/stray.csv", "intents/processed/carts.checkout.csv"]  # a day past the retention
FILES_KEPT = ["processed/new.csv", "processed/new.summary.html",  # a day inside it
              "processed/incomplete.csv", "processed/incomplete.summary.html",  # its batch is not finished
              "orders.csv"]  # waiting in the inbox itself: never the purge's


def plant_local_files(inbox, now: datetime) -> None:
    ages = {**{n: R.batch_files + 1 for n in FILES_OLD}, "processed/new.csv": R.batch_files - 1,
            "processed/new.summary.html": R.batch_files - 1, "processed/incomplete.csv": 400,
            "processed/incomplete.summary.html": 400, "orders.csv": 400}
    for name, days in ages.items():
        path = inbox / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("first_name,last_name\nAda,Zebulonova\n")
        t = (now - days * DAY).timestamp()
        os.utime(path, (t, t))


def state(engine) -> dict:
    """What is left of every planted item: True where the PHI is still there."""
    with engine.connect() as conn:
        def col(table, key, column):
            return {r[0]: r[1] for r in conn.execute(sa.select(key, column).select_from(table))}

        return {
            "rejected": {i: v is not None for i, v in col(rejected_rows, rejected_rows.c.batch_id, rejected_rows.c.value).items()},
            "outbox": {i: v is not None for i, v in col(lgc_outbox, lgc_outbox.c.client_order_id, lgc_outbox.c.body).items()},
            "events": {i: len(bytes(v)) > 0 for i, v in col(webhook_events, webhook_events.c.id, webhook_events.c.body).items()},
            "lgc": {i: len(bytes(v)) > 0 for i, v in col(lgc_results, lgc_results.c.barcode, lgc_results.c.json_body).items()},
            "values": sorted(conn.execute(sa.select(lgc_result_values.c.barcode)).scalars()),
            "rupa": {i: len(bytes(v)) > 0 for i, v in col(rupa_results, rupa_results.c.id, rupa_results.c.content).items()},
            "audit": sorted(conn.execute(sa.select(phi_access.c.id)).scalars()),
        }


@pytest.fixture
def run(settings, monkeypatch, capsys, tmp_path):
    for key in list(os.environ):
        if key.startswith(("LGC_", "LABSYNC_", "RUPA_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("LABSYNC_WAREHOUSE_URL", settings.warehouse_url)
    monkeypatch.setenv("LABSYNC_INBOX", str(tmp_path / "inbox"))

    def _run(*args: str):
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return _run


def test_dry_run_then_purge_removes_exactly_the_expired_items_of_each_class(run, engine, tmp_path):
    now = datetime.now(UTC)
    k = plant(engine, now)
    plant_local_files(tmp_path / "inbox", now)
    before = state(engine)
    files_before = sorted(str(p.relative_to(tmp_path / "inbox")) for p in (tmp_path / "inbox").rglob("*") if p.is_file())

    code, out, err = run("purge", "--dry-run", "--json")
    assert code == 0, err
    said = json.loads(out)
    expected = {"webhook_bodies": 2, "result_documents": 2, "rejected_values": 2, "outbox_bodies": 1,
                "batch_files": len(FILES_OLD), "audit": 1}
    assert said["dry_run"] is True and {c: v["count"] for c, v in said["classes"].items()} == expected
    assert said["classes"]["audit"]["retention_days"] == 2192
    assert state(engine) == before  # nothing changed, nothing recorded
    assert sorted(str(p.relative_to(tmp_path / "inbox")) for p in (tmp_path / "inbox").rglob("*") if p.is_file()) \
        == files_before
    code, out, _ = run("purge", "--dry-run")
    assert code == 0 and "webhook_bodies: would purge 2 (older than 30 days)" in out and "nothing was changed" in out

    code, out, err = run("purge", "--json")
    assert code == 0, err
    assert {c: v["count"] for c, v in json.loads(out)["classes"].items()} == expected
    after = state(engine)
    assert after["rejected"] == {k["b_old"]: False, k["b_unusable"]: False, k["b_new"]: True, k["b_incomplete"]: True}
    assert after["outbox"] == {"out_old": False, "out_new": True, "out_failed": True, "out_given_up": True,
                               "out_pending": True}
    assert after["events"] == {k["ev_old"]: False, k["ev_ignored_auth"]: False, k["ev_new"]: True,
                               k["ev_received"]: True, k["ev_failed"]: True, k["ev_ignored_unauth"]: True}
    assert after["lgc"] == {"res_old": False, "res_new": True, "res_no_hl7": True}
    assert after["values"] == ["res_new", "res_no_hl7"]
    assert after["rupa"] == {k["rupa_old"]: False, k["rupa_new"]: True, k["rupa_pending"]: True}
    left = sorted(str(p.relative_to(tmp_path / "inbox")) for p in (tmp_path / "inbox").rglob("*") if p.is_file())
    assert left == sorted(FILES_KEPT)
    with engine.connect() as conn:  # a purged event is still known: its row and sha256 stay
        kept = conn.execute(sa.select(webhook_events.c.sha256, webhook_events.c.state)
                            .where(webhook_events.c.id == k["ev_old"])).one()
    assert kept == ("ev_old".ljust(64, "0"), "applied")

    # one audit row per class purged, with its count, by the OS user; the old trail row is gone
    rows = audit.query(engine, action=AuditAction.PURGE)
    assert {r["subject_kind"]: r["record_count"] for r in rows} == expected
    assert {r["actor"] for r in rows} == {f"cli:{getpass.getuser()}"}
    assert k["audit_old"] not in after["audit"] and k["audit_new"] in after["audit"]
    assert "Zebulonova" not in json.dumps(rows, default=str)

    code, out, _ = run("purge", "--json")  # again: nothing left to purge, nothing recorded
    assert code == 0 and json.loads(out)["total"] == 0
    assert len(audit.query(engine, action=AuditAction.PURGE)) == len(expected)


def test_a_repeated_delivery_of_a_purged_event_is_still_a_duplicate(engine):
    from etl.webhooks.store import mark_events, store_event

    body = b'{"event": "order", "clientOrderId": "ORD-1"}'
    event_id, new = store_event(engine, "lgc", body, event_type="order", now=datetime.now(UTC) - 40 * DAY)
    assert new
    mark_events(engine, [(event_id, "applied", None)], now=datetime.now(UTC) - 40 * DAY)
    report = retention.purge(engine, Settings(), classes=("webhook_bodies",))
    assert report.counts()["webhook_bodies"] == 1
    assert store_event(engine, "lgc", body, event_type="order") == (event_id, False)


def test_files_are_purged_through_object_storage_too(engine, settings, s3_server):
    """On an S3 server the files' times are the server's (LastModified): the purge is run as if
    later (`now`), a day before and a day after the retention of what was planted."""
    from tests.inboxes import InboxView

    inbox = InboxView(s3_server.new_inbox())
    for name in ("processed/old.csv", "processed/old.rejects.csv", "failed/bad.csv", "failed/bad.summary.html",
                 "intents/processed/carts.csv", "processed/incomplete.csv", "orders.csv"):
        inbox.write_bytes(name, b"first_name\nAda\n")
    planted = datetime.now(UTC)
    with engine.begin() as conn:  # a batch not finished: its file stays however old
        _insert(conn, batch_files, file_name="incomplete.csv", sha256="i" * 64, status="incomplete",
                received_at=planted, processed_at=planted, stored_as="processed/incomplete.csv")
    settings = replace(settings, inbox=inbox.location)
    days = settings.retention.batch_files

    early = retention.purge(engine, settings, now=planted + (days - 1) * DAY, classes=("batch_files",))
    assert early.counts()["batch_files"] == 0
    dry = retention.purge(engine, settings, now=planted + (days + 1) * DAY, dry_run=True, classes=("batch_files",))
    assert sorted(dry.purged["batch_files"]) == ["failed/bad.csv", "failed/bad.summary.html",
                                                 "intents/processed/carts.csv", "processed/old.csv",
                                                 "processed/old.rejects.csv"]
    assert inbox.names("processed") == ["incomplete.csv", "old.csv", "old.rejects.csv"]
    done = retention.purge(engine, settings, now=planted + (days + 1) * DAY, classes=("batch_files",))
    assert sorted(done.purged["batch_files"]) == sorted(dry.purged["batch_files"])
    assert inbox.names("processed") == ["incomplete.csv"]
    assert inbox.names("failed") == [] and inbox.names("intents/processed") == []
    assert inbox.names() == ["orders.csv"]
    [row] = audit.query(engine, action=AuditAction.PURGE)
    assert row["subject_kind"] == "batch_files" and row["record_count"] == 5


def test_retention_settings_are_read_and_checked_like_every_number():
    s = Settings.from_env({"LABSYNC_RETENTION_WEBHOOK_BODIES_DAYS": "7", "LABSYNC_RETENTION_AUDIT_DAYS": "3000"})
    assert s.retention.webhook_bodies == 7 and s.retention.audit == 3000
    assert Settings.from_env({}).retention == RetentionSettings()
    assert RetentionSettings().audit == 2192
    for bad in ("-1", "nan", "1.5", "40000"):
        with pytest.raises(ConfigError, match="LABSYNC_RETENTION_BATCH_FILES_DAYS"):
            Settings.from_env({"LABSYNC_RETENTION_BATCH_FILES_DAYS": bad})


@pytest.mark.airflow
def test_the_retention_dag_purges_as_its_task_instance(airflow_env, tmp_path):  # noqa: F811  (imported below)
    """One dag.test(): the expired body goes, the audit row names the task instance."""
    from tests.conftest import migrated
    from tests.test_dags import probe

    url = migrated(f"sqlite:///{tmp_path / 'warehouse.db'}")
    from etl import warehouse
    from etl.webhooks.store import mark_events, store_event

    engine = warehouse.connect(url)
    old = datetime.now(UTC) - 31 * DAY
    expired, _ = store_event(engine, "lgc", b'{"a": 1}', event_type="order", now=old)
    waiting, _ = store_event(engine, "lgc", b'{"b": 2}', event_type="order", now=old)
    mark_events(engine, [(expired, "applied", None)], now=old)
    (tmp_path / "inbox").mkdir()
    result = probe(airflow_env, "test", "labsync_retention",
                   extra=dict(LABSYNC_WAREHOUSE_URL=url, LABSYNC_INBOX=str(tmp_path / "inbox")))
    assert result["state"] == "success", result
    assert result["returned"]["purge"]["classes"]["webhook_bodies"]["count"] == 1
    with engine.connect() as conn:
        bodies = dict(conn.execute(sa.select(webhook_events.c.id, webhook_events.c.body)).all())
    assert bytes(bodies[expired]) == b"" and bytes(bodies[waiting]) == b'{"b": 2}'
    [row] = audit.query(engine, action=AuditAction.PURGE)
    assert row["actor"].startswith("airflow:labsync_retention.purge.") and row["actor"].endswith(".1"), row
    assert row["subject_ids"] == [str(expired)] and row["record_count"] == 1


from tests.test_dags import airflow_env  # noqa: E402, F401  (the migrated Airflow home, module-scoped)
