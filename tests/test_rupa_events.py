"""Rupa events over real HTTP: the sandbox checks an intent out, moves the order on and posts
its events to the webhook receiver (with its duplicate / reorder switches); `apply_events`
turns them into rupa_orders, rupa_ordered_tests and rupa_results, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys

import httpx
import pytest
import sqlalchemy as sa

from etl import logs
from etl.checkout import events, intents
from etl.states import WebhookEventState
from etl.warehouse import rupa_ordered_tests, rupa_orders, rupa_patients, rupa_results
from etl.webhooks import store
from tests.helpers import REPO
from tests.rupa_support import cli_env, ledger, write_intents


def one_cart(engine, settings, tmp_path, *, lab_tests="labts_0000001;labts_0000002", row_id="R1") -> dict:
    path = write_intents(tmp_path / f"{row_id}.csv", [{
        "row_id": row_id, "rupa_patient_id": "pat_0000004", "lab_test_ids": lab_tests,
        "return_url": "https://app.example/back"}])
    assert intents.process_intents_file(engine, settings, path).counts == {intents.CREATED: 1}
    return ledger(engine)[row_id]


def orders(engine) -> dict[str, dict]:
    with engine.connect() as conn:
        return {r["id"]: dict(r) for r in conn.execute(sa.select(rupa_orders)).mappings()}


def ordered_tests_of(engine) -> dict[str, dict]:
    with engine.connect() as conn:
        return {r["id"]: dict(r) for r in conn.execute(sa.select(rupa_ordered_tests)).mappings()}


def results(engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(rupa_results).order_by(rupa_results.c.id)).mappings()]


def test_an_order_arrives_through_events_and_links_to_its_intent(engine, settings, rupa, receiver, tmp_path):
    receiver()
    cart = one_cart(engine, settings, tmp_path)
    order_id = rupa.checkout.submit(cart["order_intent_id"])
    rupa.checkout.advance(order_id, "In Progress")
    assert rupa.checkout.sender.flush()
    summary = events.apply_events(engine, settings)
    assert summary.events == {"applied": 2} and summary.exit_code == 0
    order = orders(engine)[order_id]
    assert order["status"] == "In Progress" and order["order_intent_id"] == cart["order_intent_id"]
    assert order["patient_id"] == "pat_0000004" and order["payer"] == "Patient" and order["date_paid"] is not None
    assert ledger(engine)["R1"]["order_id"] == order_id
    tests = ordered_tests_of(engine)
    assert sorted(t["lab_test_id"] for t in tests.values()) == ["labts_0000001", "labts_0000002"]
    assert {t["order_id"] for t in tests.values()} == {order_id}
    assert store.counts(engine, "rupa") == {WebhookEventState.APPLIED: 2}
    assert events.apply_events(engine, settings).events == {}  # nothing left to apply


@pytest.mark.parametrize("order", ["reversed", "shuffled", "duplicated"])
def test_events_applied_in_any_order_give_the_final_state(engine, settings, rupa, receiver, tmp_path, order):
    """The sandbox generates an order's whole life; the receiver gets the events in a scrambled
    order (the sender's reorder and duplicate switches, or a shuffle posted here), and they are
    applied in several runs in between. The warehouse ends where the newest event says."""
    server = receiver()
    cart = one_cart(engine, settings, tmp_path)
    ck = rupa.checkout
    ck.sender.configure(hold=True, reorder=order == "reversed", duplicates=1 if order == "duplicated" else 0)
    if order == "shuffled":
        ck.sender.configure(url=None)  # posted below, in a shuffled order
    oid = ck.submit(cart["order_intent_id"])
    ck.advance(oid, "In Progress")
    ck.add_results(oid)
    ck.advance(oid, "Complete")
    final = json.loads(json.dumps(ck.orders[oid]["attributes"]))
    if order == "shuffled":
        bodies = [json.dumps(e).encode() for e in ck.events]
        random.Random(7).shuffle(bodies)
        for i, body in enumerate(bodies):
            assert httpx.post(server.rupa_url, content=body).status_code == 200
            if i % 2:
                events.apply_events(engine, settings)  # apply between deliveries too
    else:
        ck.sender.release()
        assert ck.sender.flush()
        if order == "duplicated":
            assert len(ck.sender.delivered) == 2 * len(ck.events)
    events.apply_events(engine, settings)
    got = orders(engine)[oid]
    assert got["status"] == "Complete" == final["status"]
    assert got["attributes"] == final and got["date_completed"] is not None
    assert len(results(engine)) == 4  # a PDF and an HL7 for each of the two tests, once each
    with engine.connect() as conn:
        n_events = conn.execute(sa.text("select count(*) from webhook_events")).scalar_one()
    assert n_events == len(ck.events)  # duplicates were stored once


def test_a_repeated_new_result_stores_each_result_once_and_a_correction_adds_one(engine, settings, rupa, receiver, tmp_path):
    receiver()
    cart = one_cart(engine, settings, tmp_path, lab_tests="labts_0000003")
    ck = rupa.checkout
    oid = ck.submit(cart["order_intent_id"])
    ck.add_results(oid)
    ck.sender.flush()
    first = events.apply_events(engine, settings)
    assert first.results_stored == 2 and first.results_repeated == 0
    stored = results(engine)
    assert [r["kind"] for r in stored] == ["pdf", "hl7"]
    pdf = stored[0]
    assert bytes(pdf["content"]).startswith(b"%PDF-") and pdf["sha256"] == hashlib.sha256(pdf["content"]).hexdigest()
    assert bytes(stored[1]["content"]).startswith(b"MSH|")

    ck.renew_result_links(oid)  # Rupa repeats order.new_result: same files, fresh links
    ck.renew_result_links(oid)
    ck.sender.flush()
    again = events.apply_events(engine, settings)
    assert again.events == {"applied": 2} and again.results_stored == 0 and again.results_repeated == 2
    assert len(results(engine)) == 2

    ck.add_results(oid)  # a correction: new content
    ck.sender.flush()
    corrected = events.apply_events(engine, settings)
    assert corrected.results_stored == 2 and len(results(engine)) == 4
    assert len({r["sha256"] for r in results(engine)}) == 4


def test_expired_result_links_are_retried_on_the_next_run(engine, settings, rupa, receiver, tmp_path, caplog):
    receiver()
    cart = one_cart(engine, settings, tmp_path, lab_tests="labts_0000003")
    ck = rupa.checkout
    oid = ck.submit(cart["order_intent_id"])
    ck.add_results(oid)
    ck.sender.flush()
    ck.expire_result_links()  # the links expired before the task ran
    logs.configure()  # what the CLI and the tasks do: httpx's own URL logging stays quiet
    caplog.set_level("INFO", logger="etl")
    run1 = events.apply_events(engine, settings)
    assert run1.events == {"applied": 2} and run1.downloads_failed == 1 and run1.exit_code == 1
    (test,) = ordered_tests_of(engine).values()
    assert test["results_pending"] == 1 and "expired" in test["results_error"] and results(engine) == []

    run2 = events.apply_events(engine, settings)  # no new event: the stored links are tried again
    assert run2.events == {} and run2.downloads_failed == 1 and ordered_tests_of(engine)[test["id"]]["results_attempts"] == 2

    ck.renew_result_links(oid)  # Rupa repeats order.new_result with fresh links
    ck.sender.flush()
    run3 = events.apply_events(engine, settings)
    assert run3.results_stored == 2 and run3.downloads_failed == 0
    test = ordered_tests_of(engine)[test["id"]]
    assert test["results_pending"] == 0 and test["results_error"] is None
    # a temporary outage of the file host: the download waits for the next run too
    ck.add_results(oid)
    ck.sender.flush()
    rupa.faults.update(script=[503] * 5)  # the PDF's every try; the HL7 gets through
    during = events.apply_events(engine, settings)
    assert (during.downloads_failed, during.results_stored) == (1, 1)
    rupa.faults.reset()
    after = events.apply_events(engine, settings)
    assert (after.results_stored, after.results_repeated, after.downloads_failed) == (1, 0, 0)  # HL7 not again
    assert len(results(engine)) == 4
    # a link whose file is stored is kept only as its digest (it is a bearer credential)
    test = ordered_tests_of(engine)[test["id"]]
    assert test["results_pdf_url"].startswith("sha256:") and test["results_hl7_url"].startswith("sha256:")
    # nothing about the results (links, contents) in the logs
    text = caplog.text
    assert "/results/" not in text and "MSH|" not in text and "%PDF" not in text


def test_a_bad_signature_when_enabled_stores_nothing(engine, settings, rupa, receiver, tmp_path):
    receiver(rupa_secret="the right secret")
    cart = one_cart(engine, settings, tmp_path)
    ck = rupa.checkout
    ck.sender.configure(secret="a wrong secret")
    ck.submit(cart["order_intent_id"])
    assert ck.sender.flush()
    assert ck.sender.delivered == [("order.updated", 401)]  # refused on every retry
    assert store.counts(engine, "rupa") == {}
    assert events.apply_events(engine, settings).events == {} and orders(engine) == {}

    ck.sender.configure(secret="the right secret")
    oid = ck.submit(one_cart(engine, settings, tmp_path, row_id="R2")["order_intent_id"])
    assert ck.sender.flush() and ck.sender.delivered[-1] == ("order.updated", 200)
    events.apply_events(engine, settings)
    assert list(orders(engine)) == [oid]


def test_the_practitioners_return_links_the_order(engine, settings, rupa, receiver, tmp_path):
    server = receiver()
    rupa.checkout.sender.configure(url=None)  # no events: only the return tells
    path = write_intents(tmp_path / "ret.csv", [{
        "row_id": "R9", "rupa_patient_id": "pat_0000004", "lab_test_ids": "",
        "return_url": f"{server.url}/webhooks/rupa/return?row_id=R9"}])
    intents.process_intents_file(engine, settings, path)
    cart = ledger(engine)["R9"]
    page = httpx.post(cart["checkout_url"], data={"payer": "Practitioner"}, follow_redirects=True)
    assert page.status_code == 200 and "ord_000001" in page.text
    assert str(page.url).startswith(f"{server.url}/webhooks/rupa/return?row_id=R9&sig=")  # signed by labsync
    assert str(page.url).endswith("&order=ord_000001")  # and Rupa appended the order
    assert httpx.get(f"{server.url}/webhooks/rupa/return?row_id=R9&order=bad").status_code == 400
    events.apply_events(engine, settings)
    assert ledger(engine)["R9"]["order_id"] == "ord_000001"


def test_patient_and_lab_test_events_write_what_rupas_api_answers(engine, settings, rupa, receiver):
    """Even authenticated, a patient.* / labtest.* event only names what to GET from Rupa: the
    copy written is Rupa's answer, never the event's body; a resource Rupa does not know is not
    written."""
    server = receiver()
    truth = rupa.update_patient("pat_0000007", last_name="Newer")  # Rupa's own record changed
    lab_truth = rupa.update_lab_test("labts_0000003", name="Renamed Panel")

    def post(kind: str, resource: dict, created: str = "2026-03-02T00:00:00Z") -> None:
        body = {"event_type": kind, "created_at": created, "data": {"object": resource}}
        assert httpx.post(server.rupa_url, json=body).status_code == 200

    said = {**truth, "attributes": {**truth["attributes"], "last_name": "Forged", "email": "forger@evil.example",
                                    "updated_at": "2099-01-01T00:00:00Z"}}
    post("patient.updated", said)
    post("labtest.updated", {"type": "lab_test", "id": "labts_0000003",
                             "attributes": {"name": "Forged Panel", "updated_at": "2099-01-01T00:00:00Z"}})
    post("labtest.created", {"type": "lab_test", "id": "labts_new1", "attributes": {"name": "New Panel"}})
    post("practitioner.updated", {"type": "practitioner", "id": "prac_1"})
    post("order.updated", {"nothing": "here"})
    summary = events.apply_events(engine, settings)
    assert summary.events == {"applied": 2, "not known to Rupa": 1, "ignored": 1, "failed": 1}
    with engine.connect() as conn:
        patient = conn.execute(sa.select(rupa_patients).where(rupa_patients.c.id == "pat_0000007")).mappings().one()
        lab = conn.execute(sa.text("select name from rupa_lab_tests where id = 'labts_0000003'")).scalar_one()
        new = conn.execute(sa.text("select count(*) from rupa_lab_tests where id = 'labts_new1'")).scalar_one()
        failed = conn.execute(sa.text("select error, attempts from webhook_events where state = 'failed'")).one()
        unknown = conn.execute(sa.text("select state, error from webhook_events where event_type = 'labtest.created'")).one()
    assert (patient["last_name"], patient["email"]) == ("Newer", truth["attributes"]["email"])
    assert lab == lab_truth["attributes"]["name"] == "Renamed Panel" and new == 0
    assert unknown.state == "ignored" and "does not know" in unknown.error
    assert failed.error == "data.object is not an order" and failed.attempts == 1
    for _ in range(events.MAX_ATTEMPTS):
        events.apply_events(engine, settings)  # retried up to MAX_ATTEMPTS, then left alone
    with engine.connect() as conn:
        assert conn.execute(sa.text("select attempts from webhook_events where state = 'failed'")).scalar_one() == events.MAX_ATTEMPTS


@pytest.mark.parametrize("warehouse_url", ["sqlite"], indirect=True)  # the CLI is thin: one warehouse
def test_cli_apply_events(engine, settings, rupa, receiver, tmp_path, monkeypatch):
    receiver()
    env = {**os.environ, **cli_env(monkeypatch, settings), "PYTHONPATH": str(REPO)}
    cart = one_cart(engine, settings, tmp_path)
    oid = rupa.checkout.submit(cart["order_intent_id"])
    rupa.checkout.add_results(oid)
    rupa.checkout.sender.flush()
    done = subprocess.run([sys.executable, "-m", "etl.cli", "rupa", "apply-events"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "applied 3" in done.stdout and "results stored 4" in done.stdout
    assert "/results/" not in done.stdout + done.stderr


def test_a_patient_riding_along_in_an_order_event_does_not_undelete_it(engine, settings, rupa, receiver, tmp_path):
    server = receiver()
    cart = one_cart(engine, settings, tmp_path)
    with engine.begin() as conn:  # extraction saw pat_0000004 disappear
        conn.execute(sa.update(rupa_patients).where(rupa_patients.c.id == "pat_0000004")
                     .values(deleted_at=sa.func.now()))
    rupa.checkout.submit(cart["order_intent_id"])  # its order.updated event includes the patient
    rupa.checkout.sender.flush()
    events.apply_events(engine, settings)

    def deleted() -> bool:
        with engine.connect() as conn:
            return conn.execute(sa.select(rupa_patients.c.deleted_at)
                                .where(rupa_patients.c.id == "pat_0000004")).scalar_one() is not None

    assert deleted()
    body = {"type": "patient.updated", "created_at": "2026-03-02T00:00:00Z",
            "data": {"object": rupa.patient("pat_0000004")}}
    assert httpx.post(server.rupa_url, json=body).status_code == 200
    events.apply_events(engine, settings)
    assert not deleted()  # Rupa said it exists
