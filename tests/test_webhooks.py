"""The webhook receiver over real HTTP (uvicorn on loopback), storing into SQLite and
PostgreSQL: signatures, deduplication, size and shape limits, storage failures, health."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace

import httpx
import pytest
import sqlalchemy as sa

from etl import warehouse
from etl.asgi import BackgroundServer
from etl.settings import WebhookSettings
from etl.states import WebhookEventState
from etl.warehouse import webhook_events
from etl.webhooks import store
from etl.webhooks.app import build_app
from etl.webhooks.verify import HmacVerifier, lgc_verifier, rupa_verifier
from tests.helpers import REPO
from tests.pgserver import create_database, wait_for

LGC_KEY = base64.b64encode(b"a strong signing key of 32 bytes").decode()
ORDER_EVENT = {"type": "order", "body": {"clientOrderId": "246975",
               "callbackURL": "https://lgc.example/1111/api/v2/orders/246975",
               "orderItemStatus": {"id": "2fa58516", "status": {"code": "KitRegistered"}},
               "timestamp": "2023-05-15T16:22:11.3513804Z"}}


def lgc_signature(body: bytes, key: str = LGC_KEY) -> str:
    """Written out independently of etl.webhooks.verify: HMAC-SHA256 keyed with the key
    string's ASCII bytes, base64, behind the scheme name."""
    mac = hmac.new(key.encode("ascii"), body, hashlib.sha256).digest()
    return "LGC2-HMAC-SHA256 " + base64.b64encode(mac).decode()


def rows(engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(webhook_events).order_by(webhook_events.c.id))]


@pytest.fixture
def receiver(engine):
    def start(**changes):
        hooks = replace(WebhookSettings(), **changes)
        return BackgroundServer(build_app(engine, hooks)).start()

    servers = []
    yield lambda **changes: servers.append(start(**changes)) or servers[-1]
    for s in servers:
        s.stop()


def test_a_signed_lgc_event_is_stored_once_however_often_it_is_delivered(engine, receiver):
    server = receiver(lgc_key=LGC_KEY)
    body = json.dumps(ORDER_EVENT).encode()
    headers = {"Authorization": lgc_signature(body), "Content-Type": "application/json"}
    first = httpx.post(f"{server.url}/webhooks/lgc", content=body, headers=headers)
    again = httpx.post(f"{server.url}/webhooks/lgc", content=body, headers=headers)
    assert first.status_code == again.status_code == 200
    assert first.json() == {"ok": True, "duplicate": False} and again.json()["duplicate"] is True
    (row,) = rows(engine)
    assert row["source"] == "lgc" and row["event_type"] == "order" and row["deliveries"] == 2
    assert bytes(row["body"]) == body  # the raw bytes, exactly as received
    assert row["sha256"] == hashlib.sha256(body).hexdigest()
    assert row["state"] == WebhookEventState.RECEIVED


@pytest.mark.parametrize("auth", [None, "LGC2-HMAC-SHA256 AAAA", "Bearer something",
                                  "LGC2-HMAC-SHA256", "signed-with-another-key"])
def test_a_bad_or_missing_lgc_signature_is_401_and_stores_nothing(engine, receiver, auth):
    server = receiver(lgc_key=LGC_KEY)
    body = json.dumps(ORDER_EVENT).encode()
    if auth == "signed-with-another-key":
        auth = lgc_signature(body, base64.b64encode(b"x" * 32).decode())
    headers = {"Authorization": auth} if auth else {}
    response = httpx.post(f"{server.url}/webhooks/lgc", content=body, headers=headers)
    assert response.status_code == 401
    assert rows(engine) == []


def test_a_body_changed_after_signing_is_refused(engine, receiver):
    server = receiver(lgc_key=LGC_KEY)
    body = json.dumps(ORDER_EVENT).encode()
    tampered = body.replace(b"KitRegistered", b"ResultsAvailable")
    response = httpx.post(f"{server.url}/webhooks/lgc", content=tampered,
                          headers={"Authorization": lgc_signature(body)})
    assert response.status_code == 401 and rows(engine) == []


def test_while_a_key_is_rotated_both_keys_are_accepted(engine, receiver):
    old = base64.b64encode(b"the old key, 32 bytes long......").decode()
    server = receiver(lgc_key=f"{LGC_KEY}, {old}")
    for i, key in enumerate((LGC_KEY, old)):
        body = json.dumps({**ORDER_EVENT, "n": i}).encode()
        r = httpx.post(f"{server.url}/webhooks/lgc", content=body, headers={"Authorization": lgc_signature(body, key)})
        assert r.status_code == 200
    assert len(rows(engine)) == 2


def test_without_a_key_lgc_events_are_taken_unsigned(engine, receiver):
    server = receiver()
    r = httpx.post(f"{server.url}/webhooks/lgc", json={"type": "Result", "body": {"barcode": "LGC-1"}})
    assert r.status_code == 200 and rows(engine)[0]["event_type"] == "Result"


def test_rupa_signature_is_configurable_and_off_by_default(engine, receiver):
    event = {"event": "order.updated", "created_at": "2026-11-01T10:00:00Z", "data": {"object": {"id": "ord_1"}}}
    body = json.dumps(event).encode()
    unsigned = receiver()
    assert httpx.post(f"{unsigned.url}/webhooks/rupa", content=body).status_code == 200

    signed = receiver(rupa_secret="s3cret", rupa_header="X-Signature", rupa_encoding="hex", rupa_prefix="sha256=")
    good = "sha256=" + hmac.new(b"s3cret", body + b" ", hashlib.sha256).hexdigest()  # another body
    assert httpx.post(f"{signed.url}/webhooks/rupa", content=body + b" ", headers={"X-Signature": good}).status_code == 200
    assert httpx.post(f"{signed.url}/webhooks/rupa", content=body + b"  ", headers={"X-Signature": good}).status_code == 401
    assert httpx.post(f"{signed.url}/webhooks/rupa", content=body + b"  ").status_code == 401
    stored = rows(engine)
    assert [r["event_type"] for r in stored] == ["order.updated", "order.updated"]


def test_the_event_type_field_falls_back_from_type_to_event_to_event_type(engine, receiver):
    server = receiver()
    for doc in ({"type": "order.new_result"}, {"event": "patient.created"}, {"event_type": "labtest.updated"}, {}):
        assert httpx.post(f"{server.url}/webhooks/rupa", json=doc).status_code == 200
    assert [r["event_type"] for r in rows(engine)] == ["order.new_result", "patient.created", "labtest.updated", None]


def test_too_large_not_json_and_unknown_sources_are_refused(engine, receiver):
    server = receiver(max_body=2048)
    assert httpx.post(f"{server.url}/webhooks/lgc", content=b"{" + b" " * 4096 + b"}").status_code == 413
    assert httpx.post(f"{server.url}/webhooks/lgc", content=b"<html>maintenance</html>").status_code == 400
    assert httpx.post(f"{server.url}/webhooks/other", json={}).status_code == 404
    assert httpx.get(f"{server.url}/webhooks/lgc").status_code == 405
    assert rows(engine) == []


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_storage_failure_answers_503_so_the_vendor_retries(request, kind, tmp_path):
    # a warehouse that was never upgraded: webhook_events does not exist, every insert fails
    url = (f"sqlite:///{tmp_path / 'empty.db'}" if kind == "sqlite"
           else create_database(request.getfixturevalue("pg_admin_url")))
    engine = warehouse.make_engine(url)
    with BackgroundServer(build_app(engine, WebhookSettings())) as server:
        r = httpx.post(f"{server.url}/webhooks/lgc", json=ORDER_EVENT)
        assert r.status_code == 503 and "retry" in r.json()["error"]
        assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_readiness_follows_the_warehouse(engine, receiver):
    server = receiver()
    assert httpx.get(f"{server.url}/readyz").json() == {"ok": True}
    down = warehouse.make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with BackgroundServer(build_app(down, WebhookSettings())) as broken:
        r = httpx.get(f"{broken.url}/readyz")
        assert r.status_code == 503 and r.json()["ok"] is False


def test_pending_events_are_handed_out_oldest_first_and_marked(engine):
    ids = [store.store_event(engine, "lgc", json.dumps({"n": i}).encode(), event_type="order")[0] for i in range(3)]
    store.store_event(engine, "rupa", b"{}", event_type=None)
    pending = store.pending_events(engine, "lgc")
    assert [e.id for e in pending] == ids and pending[0].json() == {"n": 0}
    store.mark_events(engine, [(ids[0], WebhookEventState.APPLIED, None),
                               (ids[1], WebhookEventState.FAILED, "the order is unknown")])
    again = store.pending_events(engine, "lgc")
    assert [e.id for e in again] == ids[1:] and again[0].attempts == 1
    assert store.pending_events(engine, "lgc", max_attempts=1) == [again[1]]
    assert store.counts(engine, "lgc") == {"applied": 1, "failed": 1, "received": 1}


def test_verifier_objects_match_the_settings():
    assert lgc_verifier(WebhookSettings()) is None and rupa_verifier(WebhookSettings()) is None
    v = lgc_verifier(WebhookSettings(lgc_key=LGC_KEY))
    body = b'{"type":"order"}'
    assert v.sign(body) == lgc_signature(body)
    assert v(body, {"authorization": lgc_signature(body)})
    assert LGC_KEY not in repr(v) and "strong" not in repr(v)  # keys never in a repr
    hexv = HmacVerifier([b"k"], header="x-sig", encoding="hex")
    assert hexv(body, {"x-sig": hexv.sign(body).upper()})  # hex is case-insensitive


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_labsync_webhooks_serve_receives_and_stores(engine, warehouse_url):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABSYNC_", "LGC_", "RUPA_"))}
    env.update(LABSYNC_WAREHOUSE_URL=warehouse_url, LABSYNC_WEBHOOK_PORT=str(port), LGC_WEBHOOK_KEY=LGC_KEY,
               PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "etl.cli", "webhooks", "serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
            except httpx.TransportError:
                return proc.poll() is None and False

        assert wait_for(up, timeout=30), proc.stderr.read() if proc.poll() is not None else "not up"
        body = json.dumps(ORDER_EVENT).encode()
        r = httpx.post(f"http://127.0.0.1:{port}/webhooks/lgc", content=body,
                       headers={"Authorization": lgc_signature(body)})
        assert r.status_code == 200
        assert len(rows(engine)) == 1
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert "signatures checked: lgc" in out
    assert LGC_KEY not in out + err and "KitRegistered" not in out + err
