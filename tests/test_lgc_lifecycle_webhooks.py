"""LetsGetChecked webhooks end to end: the sandbox sends signed events over real HTTP to
labsync's receiver, `apply_webhooks` applies them and confirms each order with a GET. Duplicates,
reordering, bad signatures, LetsGetChecked's published signing example, callback URLs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from etl.asgi import BackgroundServer
from etl.orders.lifecycle import apply_webhooks, track
from etl.sandbox.lgc_lifecycle import LgcLifecycle
from etl.settings import WebhookSettings
from etl.states import WebhookEventState
from etl.warehouse.tables import webhook_events
from etl.webhooks import store
from etl.webhooks.verify import lgc_verifier
from tests.lifecycle_support import (
    WEBHOOK_KEY,
    history,
    items,
    lgc,
    place_orders,
    quick,
    receiver,
    send_webhooks_to,
)

# LetsGetChecked's published example (API Reference > API Notifications > Security):
# https://docs.letsgetchecked.com/documentation/API%20Reference/API%20Notifications/security
PUBLISHED_KEY = "KTNNPy4qyZuayiJuGUGetQGya46nTTb6ZRSmPNhU3y9R3u2cZY4whGsDOaKtgJmmQ5/aIzAVJNxorX2EjFD6kg=="
PUBLISHED_AUTHORIZATION = "LGC2-HMAC-SHA256 39enefrHVb+3OPH18TdAxTcVflmjLk0ymDmhx8v79j0="
PUBLISHED_DOCUMENT = {"lgcOrderRef": "d5364386-957f-41e1-8e75-282f7588133d",
                      "callbackURL": "{LGC-API}/123/order/123123123"}
# "stringify the body": the compact serialisation is what was signed
PUBLISHED_BODY = json.dumps(PUBLISHED_DOCUMENT, separators=(",", ":")).encode()


def events(engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(webhook_events).order_by(webhook_events.c.id))]


# ---- the signature ----------------------------------------------------------------------------

def test_the_verifier_accepts_letsgetcheckeds_published_example():
    verify = lgc_verifier(WebhookSettings(lgc_key=PUBLISHED_KEY))
    assert verify(PUBLISHED_BODY, {"authorization": PUBLISHED_AUTHORIZATION})
    assert verify.sign(PUBLISHED_BODY) == PUBLISHED_AUTHORIZATION
    # the body exactly as received: the page's pretty-printed rendering is a different body
    shown = b'{\n"lgcOrderRef":"d5364386-957f-41e1-8e75-282f7588133d",\n"callbackURL":"{LGC-API}/123/order/123123123"\n}'
    assert not verify(shown, {"authorization": PUBLISHED_AUTHORIZATION})
    # the key is the base64 text's own ASCII bytes, not the bytes it decodes to
    decoded = base64.b64decode(PUBLISHED_KEY)
    wrong = base64.b64encode(hmac.new(decoded, PUBLISHED_BODY, hashlib.sha256).digest()).decode()
    assert not verify(PUBLISHED_BODY, {"authorization": f"LGC2-HMAC-SHA256 {wrong}"})
    # the sandbox signs independently of etl.webhooks, and agrees with the published value
    sandbox = LgcLifecycle()
    sandbox.configure(webhook_key=PUBLISHED_KEY)
    assert sandbox.sign(PUBLISHED_BODY) == PUBLISHED_AUTHORIZATION


def test_the_receiver_stores_the_published_example_and_refuses_it_tampered(engine):
    with receiver(engine, key=PUBLISHED_KEY) as rx:
        ok = httpx.post(f"{rx.url}/webhooks/lgc", content=PUBLISHED_BODY,
                        headers={"Authorization": PUBLISHED_AUTHORIZATION, "Content-Type": "application/json"})
        bad = httpx.post(f"{rx.url}/webhooks/lgc", content=PUBLISHED_BODY.replace(b"123123123", b"123123124"),
                         headers={"Authorization": PUBLISHED_AUTHORIZATION})
    assert ok.status_code == 200 and bad.status_code == 401
    (row,) = events(engine)
    assert bytes(row["body"]) == PUBLISHED_BODY


def test_a_bad_signature_is_401_and_stores_nothing(engine, settings, sandbox):
    s = quick(settings)
    sb = lgc(sandbox).lifecycle
    other = base64.b64encode(b"not the key labsync was given...").decode()
    with receiver(engine) as rx:
        send_webhooks_to(sandbox, rx, key=other, retries=2, retry_wait=0.01)
        (coid,) = place_orders(engine, s, 1)
        sb.advance(coid)
        assert sb.wait_idle()
        send_webhooks_to(sandbox, rx, key=None, retries=0)  # unsigned while a key is configured
        sb.advance(coid)
        assert sb.wait_idle()
    assert events(engine) == []
    assert sb.delivered == 0 and sb.lost == 4
    statuses = [d["status"] for d in sb.sent]
    assert statuses == [401] * 8  # 401 is retried, like LetsGetChecked does (3 tries each, then 1)
    assert apply_webhooks(engine, s).events == 0 and items(engine) == {}


# ---- applying -----------------------------------------------------------------------------------

def test_signed_webhooks_are_applied_and_each_order_confirmed_by_a_get(engine, settings, sandbox):
    s = quick(settings)
    sb = lgc(sandbox).lifecycle
    with receiver(engine) as rx:
        send_webhooks_to(sandbox, rx)
        a, b = place_orders(engine, s, 2)
        sb.advance(a, to="ResultsAvailable")
        assert sb.wait_idle()
    stored = events(engine)
    assert len(stored) == 2 * 5 + 2  # five order events per item, one Result event per item
    assert {r["event_type"] for r in stored} == {"order", "Result"}
    summary = apply_webhooks(engine, s)
    assert (summary.events, summary.applied, summary.failed) == (12, 12, 0)
    assert summary.track.checked == 1 and lgc(sandbox).get_count[a] == 1 and lgc(sandbox).get_count[b] == 0
    got = {r["item_id"]: r for r in items(engine).values()}
    assert {r["status"] for r in got.values()} == {"ResultsAvailable"} and len(got) == 2
    for item_id, row in got.items():
        truth = sb.item(a, item_id)
        assert (row["barcode"], row["inbound_tracking"]) == (truth.barcode, truth.inbound)
        h = history(engine, item_id)
        assert [r["status"] for r in h] == ["Created", "KitDispatched", "KitRegistered", "KitArrivedAtLab",
                                            "ResultsAvailable"]
        assert {r["source"] for r in h} == {"webhook"} and all(r["webhook_event_id"] for r in h)
    assert store.counts(engine, "lgc") == {"applied": 12}
    assert apply_webhooks(engine, s).events == 0  # nothing left to apply


def test_duplicated_and_reordered_webhooks_leave_the_right_final_state(engine, settings, sandbox):
    s = quick(settings)
    sb = lgc(sandbox).lifecycle
    with receiver(engine) as rx:
        send_webhooks_to(sandbox, rx, duplicates=True, reorder=True)
        (coid,) = place_orders(engine, s, 1)
        sb.advance(coid, to="KitRegistered")  # Created, KitDispatched, KitRegistered: sent newest first, twice
        assert sb.wait_idle()
    stored = events(engine)
    assert len(stored) == 6 and {r["deliveries"] for r in stored} == {2}  # each stored once
    sent = [json.loads(r["body"])["body"]["orderItemStatus"]["status"]["code"] for r in stored]
    assert sent[:3] == ["KitRegistered", "KitDispatched", "Created"]  # really reordered

    # LetsGetChecked cannot be reached to confirm: events are hints, nothing is written
    lgc(sandbox).faults.update(error_rate=1.0, exempt_paths=["/lgc/oauth2"])
    first = apply_webhooks(engine, s)
    assert (first.applied, first.failed) == (0, 6) and "HTTP 50" in events(engine)[0]["error"]
    assert items(engine) == {}

    lgc(sandbox).faults.reset()  # the failed events are retried by the next run, and confirmed
    second = apply_webhooks(engine, s)
    assert (second.events, second.applied) == (6, 6)
    assert items(engine)
    for item_id, row in items(engine).items():
        assert (row["status"], row["status_source"]) == ("KitRegistered", "poll")
        # the events' statuses in the order they happened; the one the GET confirmed is applied
        assert [(r["status"], r["source"], r["applied"]) for r in history(engine, item_id)] == [
            ("Created", "webhook", False), ("KitDispatched", "webhook", False), ("KitRegistered", "webhook", True)]
    assert store.counts(engine, "lgc") == {"applied": 6}


def test_the_type_casing_and_status_shape_may_vary(engine, settings, sandbox):
    s = quick(settings)
    sb = lgc(sandbox).lifecycle
    with receiver(engine) as rx:
        send_webhooks_to(sandbox, rx, order_type="ORDER", result_type="result", status_shape="string")
        (coid,) = place_orders(engine, s, 1)
        sb.advance(coid, to="ResultsAvailable")
        assert sb.wait_idle()
    summary = apply_webhooks(engine, s)
    assert (summary.events, summary.applied) == (12, 12)
    assert {r["status"] for r in items(engine).values()} == {"ResultsAvailable"}


def test_callback_urls_are_never_fetched(engine, settings, sandbox):
    s = quick(settings)
    (coid,) = place_orders(engine, s, 1)
    item_id = lgc(sandbox).lifecycle.orders[coid].items[0].id
    hits = []

    async def trap(request):
        hits.append(request.url.path)
        return JSONResponse({"orderItems": []})

    trap_app = Starlette(routes=[Route("/{path:path}", trap, methods=["GET", "POST"])])
    with BackgroundServer(trap_app) as elsewhere, receiver(engine) as rx:
        doc = {"type": "order", "body": {
            "clientOrderId": coid, "callbackURL": f"{elsewhere.url}/DEMO/api/v2/orders/{coid}",
            "orderItemStatus": {"id": item_id, "status": {"code": "KitDispatched"}},
            "timestamp": "2020-01-01T00:00:00Z"}}
        body = json.dumps(doc).encode()
        sig = base64.b64encode(hmac.new(WEBHOOK_KEY.encode(), body, hashlib.sha256).digest()).decode()
        assert httpx.post(f"{rx.url}/webhooks/lgc", content=body,
                          headers={"Authorization": f"LGC2-HMAC-SHA256 {sig}"}).status_code == 200
        summary = apply_webhooks(engine, s)
    assert summary.applied == 1 and hits == []  # confirmed at the configured LetsGetChecked instead
    assert lgc(sandbox).get_count[coid] == 1
    # the poll settled the (forged) webhook: the item is where LetsGetChecked says it is
    assert items(engine)[item_id]["status"] == "Submitted"


def test_events_labsync_does_not_apply_are_marked_with_a_reason(engine, settings, sandbox):
    s = quick(settings)
    (coid,) = place_orders(engine, s, 1)
    sb = lgc(sandbox).lifecycle
    sb.advance(coid, to="KitRegistered")
    barcode = sb.orders[coid].items[0].barcode

    def put(doc) -> int:
        return store.store_event(engine, "lgc", json.dumps(doc).encode(), event_type=doc.get("type"))[0]

    outreach = put({"type": "outreach", "body": {"barcode": barcode, "status": "DeliverySent"}})
    stranger = put({"type": "order", "body": {"clientOrderId": "SOMEONE-ELSE", "timestamp": "2024-01-01T00:00:00Z"}})
    result = put({"type": "Result", "body": {"barcode": barcode, "alphaCode": "QWERTY"}})
    no_body = put({"type": "order"})

    first = apply_webhooks(engine, s)
    assert (first.events, first.applied, first.ignored, first.failed) == (4, 0, 3, 1)
    rows = {r["id"]: r for r in events(engine)}
    assert rows[outreach]["state"] == WebhookEventState.IGNORED and "outreach" in rows[outreach]["error"]
    assert rows[stranger]["state"] == WebhookEventState.IGNORED and "not in the ledger" in rows[stranger]["error"]
    assert rows[no_body]["state"] == WebhookEventState.IGNORED
    assert rows[result]["state"] == WebhookEventState.FAILED and "barcode" in rows[result]["error"]
    assert items(engine) == {}

    # an Orders v1 style event (no item status): the GET tells, and reveals the barcode, so the
    # failed result event applies in the same pass
    v1 = put({"type": "Order", "body": {"clientOrderId": coid, "callbackURL": "x", "timestamp": "2024-01-01T00:00:00Z"}})
    second = apply_webhooks(engine, s)
    assert (second.events, second.applied, second.failed) == (2, 2, 0)
    assert {r["status"] for r in items(engine).values()} == {"KitRegistered"}
    assert {r["id"]: r["state"] for r in events(engine)}[v1] == WebhookEventState.APPLIED
    assert store.counts(engine, "lgc") == {"applied": 2, "ignored": 3}
    assert lgc(sandbox).get_count[coid] == 1  # one GET answered both


@pytest.mark.parametrize("attempts", [1])
def test_events_that_keep_failing_stop_being_retried(engine, settings, sandbox, attempts):
    s = quick(settings, max_event_attempts=attempts)
    store.store_event(engine, "lgc", json.dumps({"type": "Result", "body": {"barcode": "LGC-0000-0000-0001"}}).encode(),
                      event_type="Result")
    assert apply_webhooks(engine, s).failed == 1
    assert apply_webhooks(engine, s).events == 0  # failed `attempts` times: left alone
    assert track(engine, s).orders == 0
