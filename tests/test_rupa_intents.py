"""Rupa order intents over real HTTP against the sandbox, into SQLite and PostgreSQL: the CSV
contract through the one validator, get-or-create patients (de-duplicated by Rupa), one cart per
row id across reruns and a killed run, the checkout report, the inbox subfolder, the CLI."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from etl.checkout import inbox as intents_inbox
from etl.checkout import intents
from etl.claims import aware
from etl.errors import UnusableInputError
from etl.states import IntentState
from etl.warehouse import batch_files, rejected_rows
from tests.helpers import REPO
from tests.inboxes import InboxView
from tests.pgserver import wait_for
from tests.rupa_support import cli_env, ledger, write_intents


def row(row_id: str, **cells) -> dict:
    return {"row_id": row_id, "lab_test_ids": "labts_0000001", "return_url": f"https://app.example/back/{row_id}",
            **cells}


def carts_by_row(rupa) -> dict[str, int]:
    """How many order intents the sandbox holds per row (each row has its own return_url)."""
    out: dict[str, int] = {}
    for res in rupa.order_intents.values():
        rid = res["attributes"]["return_url"].rsplit("/", 1)[1]
        out[rid] = out.get(rid, 0) + 1
    return out


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def test_a_batch_with_new_and_existing_patients_gets_one_cart_per_row(engine, settings, rupa, tmp_path):
    existing = rupa.patient("pat_0000005")["attributes"]
    path = write_intents(tmp_path / "carts.csv", [
        row("R1", rupa_patient_id="pat_0000003", lab_test_ids="labts_0000001; labts_0000002", **{"metadata.visit": "v1"}),
        row("R2", first_name="Katherine", last_name="Johnson", email="kj@example.test", birthday="1918-08-26"),
        row("R3", first_name="Katherine", last_name="Johnson", email="kj@example.test"),  # same patient again
        row("R4", first_name=existing["first_name"], last_name=existing["last_name"], email=existing["email"]),
        row("R5", rupa_patient_id="pat_9999999"),  # not in the warehouse
        row("R6", rupa_patient_id="pat_0000001", lab_test_ids="labts_0000001;labts_0009999"),
        row("R7", first_name="No", last_name="Email"),
        row("R8", rupa_patient_id="pat_0000002", return_url="javascript:alert(1)"),
    ])
    posts_before = rupa.stats["POST /patients"]
    out = intents.process_intents_file(engine, settings, path)

    assert (out.total_rows, out.valid_rows, out.rejected_rows) == (8, 4, 4)
    assert out.counts == {intents.CREATED: 4} and out.status == "loaded" and out.exit_code == 1
    rows = ledger(engine)
    assert set(rows) == {"R1", "R2", "R3", "R4"}
    assert {r["state"] for r in rows.values()} == {IntentState.CREATED}
    assert rows["R1"]["patient_id"] == "pat_0000003" and rows["R1"]["lab_test_ids"] == ["labts_0000001", "labts_0000002"]
    assert rows["R1"]["meta"] == {"visit": "v1"}
    assert rows["R2"]["patient_id"] == rows["R3"]["patient_id"] != "pat_0000003"  # Rupa de-duplicated
    assert rows["R4"]["patient_id"] == "pat_0000005"  # an existing patient found by name + email
    assert rupa.stats["POST /patients"] - posts_before == 3 and len(rupa.patients.added) == 1
    assert rupa.stats["patient_deduplicated"] == 2
    assert carts_by_row(rupa) == {"R1": 1, "R2": 1, "R3": 1, "R4": 1}
    for r in rows.values():
        intent = rupa.order_intents[r["order_intent_id"]]
        assert r["checkout_url"] == intent["attributes"]["checkout_url"]
        assert intent["relationships"]["patient"]["data"]["id"] == r["patient_id"]

    # the reasons, by row id and column
    reasons = {(p["row_id"], p["column"]): p["reason"] for p in read_csv(tmp_path / "carts.rejects.csv")}
    assert "not among the Rupa patients in the warehouse" in reasons[("R5", "rupa_patient_id")]
    assert "'labts_0009999' is not among the Rupa lab tests" in reasons[("R6", "lab_test_ids")]
    assert "email is required when rupa_patient_id is empty" in reasons[("R7", "email")]
    assert "is not a web address" in reasons[("R8", "return_url")]
    with engine.connect() as conn:
        stored = conn.execute(sa.select(rejected_rows.c.client_order_id).distinct()).scalars().all()
    assert sorted(stored) == ["R5", "R6", "R7", "R8"]

    # the checkout report: a CSV of the links and a page with one clickable link per patient
    links = read_csv(tmp_path / "carts.checkout.csv")
    assert [(r["row_id"], r["state"], r["checkout_url"]) for r in links] == [
        (rid, "created", rows[rid]["checkout_url"]) for rid in ("R1", "R2", "R3", "R4")]
    assert links[1]["patient"] == "Katherine Johnson" and links[0]["rupa_patient_id"] == "pat_0000003"
    page = (tmp_path / "carts.summary.html").read_text()
    for rid in ("R1", "R2", "R3", "R4"):
        assert f'href="{rows[rid]["checkout_url"]}"' in page
    assert "Katherine Johnson" in page and "rupa_patient_id" in page  # patient and the R5 reason


def test_a_rerun_and_a_renamed_copy_send_no_second_cart(engine, settings, rupa, tmp_path):
    rows_in = [row(f"R{i}", rupa_patient_id=f"pat_000000{i}") for i in range(1, 4)]
    first = intents.process_intents_file(engine, settings, write_intents(tmp_path / "a.csv", rows_in))
    assert first.counts == {intents.CREATED: 3}
    again = intents.process_intents_file(engine, settings, tmp_path / "a.csv")
    copy = intents.process_intents_file(engine, settings, write_intents(tmp_path / "copy.csv", rows_in))
    assert again.counts == copy.counts == {intents.ALREADY: 3} and copy.exit_code == 0
    assert carts_by_row(rupa) == {"R1": 1, "R2": 1, "R3": 1}
    assert read_csv(tmp_path / "copy.checkout.csv")[0]["checkout_url"] == ledger(engine)["R1"]["checkout_url"]

    # the same row_id with different content is not sent, and says why
    changed = intents.process_intents_file(engine, settings, write_intents(
        tmp_path / "changed.csv", [row("R1", rupa_patient_id="pat_0000009")]))
    assert changed.counts == {intents.ALREADY: 1} and len(rupa.order_intents) == 3


def test_a_lost_answer_is_sent_again_next_run_and_shown(engine, settings, rupa, tmp_path):
    """The connection drops after Rupa created the cart (the sandbox's drop switch): the row is
    left `sending`; the next run sends it again and says a second cart may exist."""
    path = write_intents(tmp_path / "drop.csv", [row("R1", rupa_patient_id="pat_0000001")])
    rupa.faults.update(script=["drop"])  # the order-intent request is processed, its answer lost
    out = intents.process_intents_file(engine, settings, path)
    assert out.counts == {intents.UNKNOWN: 1} and out.status == "incomplete" and out.exit_code == 1
    (r,) = ledger(engine).values()
    assert r["state"] == IntentState.SENDING and "outcome is unknown" in r["last_error"]
    # not retried inside the run (Rupa takes no idempotency key): one request, one unknown cart
    assert r["claimed_by"] is None and len(rupa.order_intents) == 1 and rupa.stats["POST /order_intents"] == 1

    again = intents.process_intents_file(engine, settings, path)
    assert again.counts == {intents.CREATED: 1} and again.resent == 1 and again.exit_code == 0
    r = ledger(engine)["R1"]
    assert r["state"] == IntentState.CREATED and r["resends"] == 1 and r["attempts"] == 2
    assert len(rupa.order_intents) == 2 and r["order_intent_id"] == "ordin_000002"
    assert "second, unused cart" in again.line()
    note = read_csv(tmp_path / "drop.checkout.csv")[0]["note"]
    assert "extra, unused cart" in note


def test_throttling_is_retried_within_the_run_and_an_outage_leaves_a_failed_row(engine, settings, rupa, tmp_path):
    path = write_intents(tmp_path / "busy.csv", [row("R1", rupa_patient_id="pat_0000001")])
    rupa.faults.update(script=[429, 429])  # "not processed": safe to retry at once
    assert intents.process_intents_file(engine, settings, path).counts == {intents.CREATED: 1}
    assert len(rupa.order_intents) == 1
    path2 = write_intents(tmp_path / "down.csv", [row("R2", first_name="Mary", last_name="Jackson",
                                                      email="mj@example.test")])
    rupa.faults.update(script=[503] * 10)  # the patient step fails: nothing was sent for the cart
    out = intents.process_intents_file(engine, settings, path2)
    assert out.counts == {intents.FAILED: 1} and ledger(engine)["R2"]["state"] == IntentState.FAILED
    assert "Mary" not in (ledger(engine)["R2"]["last_error"] or "")
    rupa.faults.reset()
    again = intents.process_intents_file(engine, settings, path2)
    assert again.counts == {intents.CREATED: 1} and again.resent == 0 and len(rupa.order_intents) == 2


def test_a_rupa_refusal_is_recorded_and_not_resent(engine, settings, rupa, tmp_path):
    rupa.delete_lab_test("labts_0000004")  # gone at Rupa, still in the warehouse copy
    path = write_intents(tmp_path / "gone.csv", [row("R1", rupa_patient_id="pat_0000001", lab_test_ids="labts_0000004")])
    out = intents.process_intents_file(engine, settings, path)
    assert out.counts == {intents.REJECTED: 1} and out.exit_code == 1
    r = ledger(engine)["R1"]
    assert r["state"] == IntentState.REJECTED and "Unknown lab test" in r["last_error"]
    again = intents.process_intents_file(engine, settings, path)
    assert again.counts == {intents.REJECTED: 1} and rupa.stats["POST /order_intents"] == 1


def test_unusable_files_send_nothing(engine, settings, rupa, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("row_id,client_order_id,return_url\nR1,x,https://a.example\n")
    with pytest.raises(UnusableInputError, match="unknown column 'client_order_id'.*metadata.<key>"):
        intents.process_intents_file(engine, settings, bad)
    missing = tmp_path / "missing.csv"
    missing.write_text("row_id,rupa_patient_id\nR1,pat_0000001\n")
    with pytest.raises(UnusableInputError, match="required column missing: return_url"):
        intents.process_intents_file(engine, settings, missing)
    assert rupa.stats["POST /order_intents"] == 0
    with engine.connect() as conn:
        assert set(conn.execute(sa.select(batch_files.c.status)).scalars()) == {"unusable"}


def test_refused_credentials_stop_the_run_and_lose_nothing(engine, settings, rupa, tmp_path):
    from etl.errors import AuthError

    path = write_intents(tmp_path / "auth.csv", [row(f"R{i}", rupa_patient_id=f"pat_000000{i}") for i in range(1, 4)])
    rupa.revoke_all()  # the practitioner disconnected labsync
    with pytest.raises(AuthError, match="labsync rupa authorize"):
        intents.process_intents_file(engine, settings, path)
    assert rupa.order_intents == {} and all(r["state"] == IntentState.FAILED for r in ledger(engine).values())
    with engine.connect() as conn:
        assert conn.execute(sa.select(batch_files.c.status)).scalar_one() == "incomplete"
    from tests.rupa_support import authorize

    authorize(engine, settings)
    assert intents.process_intents_file(engine, settings, path).counts == {intents.CREATED: 3}
    assert carts_by_row(rupa) == {"R1": 1, "R2": 1, "R3": 1}


def test_the_inbox_subfolder_is_processed_and_filed(engine, settings, rupa, tmp_path, inbox_location):
    """On a local folder and on the S3 server alike: claimed in the warehouse, read from a
    temporary copy, reports put beside the file, moved by copy-then-delete."""
    settings = replace(settings, inbox=inbox_location)
    box = InboxView(inbox_location)
    box.put(write_intents(tmp_path / "monday.csv", [row("R1", rupa_patient_id="pat_0000001"), row("R2")]),
            "intents/monday.csv")
    box.write_bytes("intents/broken.csv", b"\x00\x01binary")
    # left in processing/ by a labsync that claimed by renaming: picked up, not forgotten
    box.put(write_intents(tmp_path / "old.csv", [row("R3", rupa_patient_id="pat_0000001")]),
            "intents/processing/old.csv")
    outcomes = {o["name"]: o for o in intents_inbox.process_intents_inbox(engine, settings, settle_seconds=0)}
    assert outcomes["monday.csv"]["status"] == "loaded" and outcomes["monday.csv"]["counts"] == {intents.CREATED: 1}
    assert outcomes["old.csv"]["status"] == "loaded" and outcomes["old.csv"]["counts"] == {intents.CREATED: 1}
    assert outcomes["broken.csv"]["status"] == "unusable"
    assert box.names("intents/processed") == [
        "monday.checkout.csv", "monday.csv", "monday.rejects.csv", "monday.summary.html",
        "old.checkout.csv", "old.csv", "old.summary.html"]
    assert box.names("intents/failed") == ["broken.csv", "broken.summary.html"]
    assert box.names("intents") == [] and box.names("intents/processing") == []
    links = box.read("intents/processed/monday.checkout.csv")
    assert "R1" in links and "checkout" in links
    assert outcomes["monday.csv"]["checkout_path"].endswith("intents/processed/monday.checkout.csv")
    assert json.dumps(outcomes)  # fit for XCom
    with engine.connect() as conn:
        claimed = conn.execute(sa.select(sa.func.count()).select_from(batch_files)
                               .where(batch_files.c.claimed_by.is_not(None))).scalar_one()
    assert claimed == 0
    assert intents_inbox.process_intents_inbox(engine, settings, settle_seconds=0) == []


def test_an_intents_file_another_run_holds_is_left_alone(engine, settings, rupa, tmp_path, inbox_location):
    """Two runs at once: the warehouse's claim on the file's content decides, not a rename."""
    from etl.intake import records

    settings = replace(settings, inbox=inbox_location)
    box = InboxView(inbox_location)
    path = write_intents(tmp_path / "tue.csv", [row("R1", rupa_patient_id="pat_0000001")])
    box.put(path, "intents/tue.csv")
    batch_id = records.register_batch(engine, "tue.csv", intents_inbox.IntentsInbox.of(settings).store.sha256("tue.csv"))
    assert records.claim_batch(engine, batch_id, owner="ti:other/run/intents/-1", lease=timedelta(minutes=5))
    assert intents_inbox.process_intents_inbox(engine, settings, settle_seconds=0) == []
    assert box.names("intents") == ["tue.csv"] and rupa.stats["POST /order_intents"] == 0
    records.release_batch(engine, batch_id, owner="ti:other/run/intents/-1")
    (done,) = intents_inbox.process_intents_inbox(engine, settings, settle_seconds=0)
    assert done["status"] == "loaded" and box.names("intents/processed") == [
        "tue.checkout.csv", "tue.csv", "tue.summary.html"]


def _cli(env: dict, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "etl.cli", *args], env=env, capture_output=True,
                          text=True, timeout=120, cwd=REPO, **kw)


@pytest.mark.parametrize("warehouse_url", ["sqlite"], indirect=True)  # the CLI is thin: one warehouse
def test_cli_intents_dry_run_then_run(engine, settings, rupa, tmp_path, monkeypatch):
    env = {**os.environ, **cli_env(monkeypatch, settings), "PYTHONPATH": str(REPO)}
    path = write_intents(tmp_path / "cli.csv", [
        row("R1", rupa_patient_id="pat_0000001"),
        row("R2", first_name="Dorothy", last_name="Vaughan", email="dv@example.test"),
        row("R3", rupa_patient_id="nope")])
    dry = _cli(env, "intents", str(path), "--dry-run")
    assert dry.returncode == 1, dry.stderr
    assert "2 rows would be sent" in dry.stdout and "Nothing was sent" in dry.stdout
    requests = [json.loads(line) for line in (tmp_path / "cli.requests.jsonl").read_text().splitlines()]
    assert [(r["row_id"], r["url"].rsplit("/", 1)[1]) for r in requests] == [
        ("R1", "order_intents"), ("R2", "patients"), ("R2", "order_intents")]
    assert requests[0]["headers"]["Authorization"] == "Bearer ***"
    assert rupa.stats["POST /order_intents"] == 0 and ledger(engine) == {}

    done = _cli(env, "intents", str(path))
    assert done.returncode == 1, done.stderr  # R3 was rejected
    assert "created 2" in done.stdout and "rejected before sending 1" in done.stdout
    assert "cli.summary.html" in done.stdout and "Dorothy" not in done.stdout + done.stderr
    again = _cli(env, "intents", str(path), "--dry-run", "--requests", "-")
    assert "0 rows would be sent (2 already settled" in again.stderr
    box = InboxView(str(settings.inbox))
    box.put(path, "intents/cli.csv")
    inbox = _cli({**env, "LABSYNC_INBOX": str(settings.inbox), "LABSYNC_INBOX_SETTLE_SECONDS": "0"}, "intents", "--inbox")
    assert inbox.returncode == 1 and "cli.csv: loaded (already created 2)" in inbox.stdout, inbox.stderr
    assert box.exists("intents/processed/cli.checkout.csv")


def test_a_run_killed_mid_batch_sends_no_second_cart_for_any_row(engine, settings, rupa, tmp_path, monkeypatch):
    """SIGKILL while requests are in flight (RUPA_CONCURRENCY rows at a time), then run again:
    every row ends with one recorded cart; a row the kill left `sending` is the only kind that can
    have a second cart at Rupa, and it is counted."""
    # a short lease, so the dead run's claims lapse soon (a live run's heartbeat renews them)
    env = {**os.environ, **cli_env(monkeypatch, settings), "PYTHONPATH": str(REPO),
           "LABSYNC_LEASE_SECONDS": "2", "LABSYNC_HEARTBEAT_SECONDS": "0.5"}
    rows_in = [row(f"R{i}", rupa_patient_id=f"pat_00000{i:02d}") for i in range(1, 17)]
    path = write_intents(tmp_path / "kill.csv", rows_in)
    rupa.faults.update(latency=0.25)
    proc = subprocess.Popen([sys.executable, "-m", "etl.cli", "intents", str(path)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: len(rupa.order_intents) >= 3, timeout=60)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    rupa.faults.reset()
    at_kill = ledger(engine)
    assert sum(r["state"] == IntentState.CREATED for r in at_kill.values()) < 16  # it really died mid-batch
    left_sending = {rid for rid, r in at_kill.items() if r["state"] == IntentState.SENDING}
    assert len(left_sending) <= settings.rupa.concurrency  # at most the rows in flight

    def lapsed() -> bool:  # what a next run waits for: no claim of the dead run is live
        now = datetime.now(UTC)
        return all(r["claimed_until"] is None or aware(r["claimed_until"]) < now
                   for r in ledger(engine).values())

    assert wait_for(lapsed, timeout=30)
    out = intents.process_intents_file(engine, settings, path)
    assert out.exit_code == 0 and out.resent == len(left_sending)
    final = ledger(engine)
    assert {r["state"] for r in final.values()} == {IntentState.CREATED} and len(final) == 16
    carts = carts_by_row(rupa)
    for rid, r in final.items():
        # exactly one cart, except a row the kill left `sending`: its first request may or may
        # not have reached Rupa before the process died, so it holds one or two
        assert 1 <= carts[rid] <= 1 + r["resends"], rid
        if not r["resends"]:
            assert carts[rid] == 1, rid
        assert r["order_intent_id"] in rupa.order_intents
    assert sum(r["resends"] for r in final.values()) == len(left_sending)
    again = intents.process_intents_file(engine, settings, path)
    assert again.counts == {intents.ALREADY: 16} and carts_by_row(rupa) == carts
