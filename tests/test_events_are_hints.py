"""The trust boundary, issue 21 point 1: events are hints; the vendor's API is the truth.

Forged deliveries are posted to labsync's real receiver (in-process on a loopback port, and the
`labsync webhooks serve` process itself), with no signature, as an attacker who found the URL
would; they are applied by the real tasks against the sandboxes on loopback. What reaches the
warehouse is what the vendor's own API answered: a LetsGetChecked event names an order to GET
(an item the GET does not list is never created; a status is the GET's, never the event's; an
item the GET stops listing is marked `NotListed`), a Rupa patient/lab-test event names what to GET
from Rupa, and a Rupa order event, which Rupa's API cannot confirm, is applied only when the
delivery is authenticated (a signature, or the capability path RUPA_WEBHOOK_PATH).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import replace

import httpx
import pytest
import sqlalchemy as sa

from etl.asgi import BackgroundServer
from etl.checkout import events, intents
from etl.orders.lifecycle import Observation, apply_observations, apply_webhooks, open_orders, track
from etl.settings import WebhookSettings
from etl.states import ItemStatus, StatusSource
from etl.warehouse import rupa_ordered_tests, rupa_orders, rupa_patients
from etl.webhooks import store
from etl.webhooks.app import build_app
from etl.webhooks.verify import lgc_verifier
from tests.lifecycle_support import WEBHOOK_KEY, history, items, lgc, place_orders, quick
from tests.lifecycle_support import receiver as lgc_receiver
from tests.netpeers import EchoServer
from tests.rupa_support import ledger, write_intents
from tests.test_receiver_limits import serving

SQLITE = pytest.mark.parametrize("warehouse_url", ["sqlite"], indirect=True)


def _lgc_event(coid: str, item_id: str, status: str, when: str = "2030-01-01T00:00:00Z") -> bytes:
    return json.dumps({"type": "order", "body": {
        "clientOrderId": coid, "orderItemStatus": {"id": item_id, "status": {"code": status}},
        "timestamp": when, "callbackURL": "http://127.0.0.1:9/steal"}}).encode()


def _webhook_rows(engine) -> dict[int, dict]:
    with engine.connect() as conn:
        return {r["id"]: dict(r) for r in conn.execute(sa.select(store.webhook_events)).mappings()}


# ---- LetsGetChecked ---------------------------------------------------------------------------------
def test_forged_unsigned_lgc_events_write_nothing_the_get_does_not_confirm(engine, settings, sandbox):
    """No LGC_WEBHOOK_KEY (the receiver on loopback): a forged `Cancelled` for a real item, an item
    LetsGetChecked never made, an order not in the ledger. One GET per real order; what is stored
    is that GET's answer; no event status in the history."""
    s = quick(settings)
    coid, other = place_orders(engine, s, 2)
    real = lgc(sandbox).lifecycle.item(coid)
    with lgc_receiver(engine, key=None) as rx:
        for body in (_lgc_event(coid, real.id, "Cancelled"), _lgc_event(coid, "forged-item-1", "Cancelled"),
                     _lgc_event("NOT-IN-LEDGER", "forged-item-2", "ResultsAvailable")):
            assert httpx.post(f"{rx.url}/webhooks/lgc", content=body).status_code == 200
    assert {r["authenticated"] for r in _webhook_rows(engine).values()} == {False}
    summary = apply_webhooks(engine, s)
    assert (summary.events, summary.applied, summary.ignored, summary.failed) == (3, 2, 1, 0)
    assert lgc(sandbox).get_count[coid] == 1 and lgc(sandbox).get_count[other] == 0
    got = items(engine)
    assert set(got) == {i.id for i in lgc(sandbox).lifecycle.orders[coid].items}  # nothing forged created
    assert got[real.id]["status"] == real.status != "Cancelled"
    assert got[real.id]["status_source"] == StatusSource.POLL
    assert all(h["source"] == StatusSource.POLL for h in history(engine))
    assert "Cancelled" not in {h["status"] for h in history(engine)}


def test_when_the_confirming_get_fails_a_forged_event_writes_nothing(engine, settings, sandbox):
    s = quick(settings)
    (coid,) = place_orders(engine, s, 1)
    real = lgc(sandbox).lifecycle.item(coid)
    with lgc_receiver(engine, key=None) as rx:
        assert httpx.post(f"{rx.url}/webhooks/lgc", content=_lgc_event(coid, real.id, "Cancelled")).status_code == 200
    lgc(sandbox).faults.update(error_rate=1.0, exempt_paths=["/lgc/oauth2"])
    summary = apply_webhooks(engine, s)
    assert (summary.applied, summary.failed) == (0, 1)
    assert items(engine) == {} and history(engine) == []


def test_a_signed_event_naming_an_item_the_get_does_not_list_creates_nothing(engine, settings, sandbox):
    """Authenticated events are recorded in the history, and only for items the GET lists."""
    s = quick(settings)
    (coid,) = place_orders(engine, s, 1)
    real = lgc(sandbox).lifecycle.item(coid)
    sign = lgc_verifier(WebhookSettings(lgc_key=WEBHOOK_KEY)).sign
    with lgc_receiver(engine) as rx:
        for body in (_lgc_event(coid, "ghost-item", "Cancelled"),
                     _lgc_event(coid, real.id, "Created", "2020-01-01T00:00:00Z")):
            assert httpx.post(f"{rx.url}/webhooks/lgc", content=body,
                              headers={"Authorization": sign(body)}).status_code == 200
    assert {r["authenticated"] for r in _webhook_rows(engine).values()} == {True}
    apply_webhooks(engine, s)
    assert set(items(engine)) == {i.id for i in lgc(sandbox).lifecycle.orders[coid].items} and "ghost-item" not in items(engine)
    assert items(engine)[real.id]["status"] == real.status  # the GET's answer, not the event's
    told = [(h["status"], h["source"]) for h in history(engine) if h["source"] == StatusSource.WEBHOOK]
    assert told == [("Created", StatusSource.WEBHOOK)]  # recorded as what the event said, nothing more


def test_an_item_the_get_no_longer_lists_is_marked_not_listed(engine, settings, sandbox):
    """A status written from an event before events became hints (or an item LetsGetChecked
    dropped): the next GET of its order marks it `NotListed`, and the order is not asked about
    forever because of it."""
    s = quick(settings)
    (coid,) = place_orders(engine, s, 1)
    apply_observations(engine, [Observation("ghost-item", coid, ItemStatus.KIT_DISPATCHED, None,
                                            StatusSource.WEBHOOK)])
    sb = lgc(sandbox).lifecycle
    sb.advance(coid, to="ResultsAvailable")  # the real items end; the ghost would keep the order open
    track(engine, s, [coid])
    got = items(engine)
    assert got["ghost-item"]["status"] == ItemStatus.NOT_LISTED
    assert {r["status"] for k, r in got.items() if k != "ghost-item"} == {"ResultsAvailable"}
    ghost = [(h["status"], h["previous_status"], h["source"]) for h in history(engine, "ghost-item")]
    assert ghost[-1] == (ItemStatus.NOT_LISTED, ItemStatus.KIT_DISPATCHED, StatusSource.POLL)
    assert coid not in open_orders(engine)
    track(engine, s, [coid])  # marked once
    assert len(history(engine, "ghost-item")) == len(ghost)


# ---- Rupa -----------------------------------------------------------------------------------------
def _intent(engine, settings, tmp_path, row_id: str = "R1") -> dict:
    path = write_intents(tmp_path / f"{row_id}.csv", [{
        "row_id": row_id, "rupa_patient_id": "pat_0000004", "lab_test_ids": "labts_0000001",
        "return_url": "https://app.example/back"}])
    assert intents.process_intents_file(engine, settings, path).counts == {intents.CREATED: 1}
    return ledger(engine)[row_id]


def _tables(engine) -> dict[str, list]:
    with engine.connect() as conn:
        return {"orders": list(conn.execute(sa.select(rupa_orders.c.id, rupa_orders.c.status))),
                "tests": list(conn.execute(sa.select(rupa_ordered_tests.c.id, rupa_ordered_tests.c.results_pdf_url))),
                "patients": list(conn.execute(sa.select(rupa_patients.c.id, rupa_patients.c.email,
                                                        rupa_patients.c.content_sha256).order_by(rupa_patients.c.id)))}


@SQLITE
def test_forged_unsigned_rupa_events_at_the_receiver_process_change_nothing(engine, settings, rupa, tmp_path):
    """`labsync webhooks serve` on loopback without RUPA_WEBHOOK_SECRET / _PATH: a forged
    patient.updated (the attacker's email), a forged order.new_result whose result links name a
    canary on another loopback port, a forged order.updated for a real intent. The canary gets
    no request; rupa_* tables are as they were but for what Rupa's API said."""
    cart = _intent(engine, settings, tmp_path)
    truth = rupa.patient("pat_0000004")
    before = _tables(engine)
    with EchoServer() as canary, serving(settings.warehouse_url, tmp_path) as rx:
        forged = [
            {"type": "patient.updated", "created_at": "2099-01-01T00:00:00Z", "data": {"object": {
                **truth, "attributes": {**truth["attributes"], "email": "forger@evil.example",
                                        "updated_at": "2099-01-01T00:00:00Z"}}}},
            {"type": "order.new_result", "created_at": "2099-01-01T00:00:00Z", "data": {
                "object": {"type": "order", "id": "ord_forged", "attributes": {"status": "Complete"},
                           "relationships": {"order_intent": {"data": {"type": "order_intent",
                                                                       "id": cart["order_intent_id"]}}}},
                "included": [{"type": "ordered_test", "id": "ordts_forged", "attributes": {
                    "results_pdf": f"{canary.url}/steal.pdf", "results_hl7": f"{canary.url}/steal.hl7"}}]}},
        ]
        for doc in forged:
            assert httpx.post(f"{rx.url}/webhooks/rupa", json=doc).status_code == 200
        summary = events.apply_events(engine, settings)
        assert canary.seen == [] and canary.connections == 0
    assert summary.events == {"applied": 1, "unauthenticated": 1}
    assert _tables(engine) == before  # the patient re-read from Rupa: unchanged; no order, no test
    assert ledger(engine)["R1"]["order_id"] is None
    rows = _webhook_rows(engine)
    assert {r["authenticated"] for r in rows.values()} == {False}
    (set_aside,) = [r for r in rows.values() if r["event_type"] == "order.new_result"]
    assert set_aside["state"] == "ignored" and "not authenticated" in set_aside["error"]


def test_an_order_event_is_applied_once_delivered_authenticated(engine, settings, rupa, receiver, tmp_path):
    """Rupa's genuine events, first reaching the bare (unauthenticated) URL, are set aside; the
    same events delivered to the capability path are applied."""
    open_rx = receiver(authenticated=False)
    cart = _intent(engine, settings, tmp_path)
    oid = rupa.checkout.submit(cart["order_intent_id"])
    assert rupa.checkout.sender.flush()
    assert events.apply_events(engine, settings).events == {"unauthenticated": 1}
    assert _tables(engine)["orders"] == []
    bodies = [bytes(r["body"]) for r in _webhook_rows(engine).values()]

    secret = secrets.token_urlsafe(32)
    hooks = replace(WebhookSettings(), rupa_path_secret=secret)
    with BackgroundServer(build_app(engine, hooks, fernet_key=settings.fernet_key)) as rx:
        assert httpx.post(f"{rx.url}/webhooks/rupa", content=bodies[0]).status_code == 404  # bare path closed
        assert httpx.post(f"{rx.url}/webhooks/rupa/{secrets.token_urlsafe(32)}",
                          content=bodies[0]).status_code == 404  # a wrong secret
        assert len(_webhook_rows(engine)) == 1
        assert httpx.post(f"{rx.url}/webhooks/rupa/{secret}", content=bodies[0]).json() == {
            "ok": True, "duplicate": True}
    assert events.apply_events(engine, settings).events == {"applied": 1}
    assert [o.id for o in _tables(engine)["orders"]] == [oid] and ledger(engine)["R1"]["order_id"] == oid
    (row,) = _webhook_rows(engine).values()
    assert (row["authenticated"], row["deliveries"], row["state"]) == (True, 2, "applied")
    del open_rx


def test_a_signed_rupa_delivery_is_authenticated(engine, settings, rupa, receiver, tmp_path):
    receiver(rupa_secret="the secret")
    rupa.checkout.sender.configure(secret="the secret")
    cart = _intent(engine, settings, tmp_path)
    oid = rupa.checkout.submit(cart["order_intent_id"])
    assert rupa.checkout.sender.flush()
    assert {r["authenticated"] for r in _webhook_rows(engine).values()} == {True}
    assert events.apply_events(engine, settings).events == {"applied": 1}
    assert [o.id for o in _tables(engine)["orders"]] == [oid]


@pytest.mark.parametrize("secret", ["too-short", "x" * 31, "a/b" + "c" * 40, "é" * 40])
def test_a_weak_capability_path_is_a_configuration_error(secret):
    from etl.errors import ConfigError

    with pytest.raises(ConfigError, match="RUPA_WEBHOOK_PATH"):
        WebhookSettings(rupa_path_secret=secret).validated()
