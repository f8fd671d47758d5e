"""A receiver that holds up (the trust boundary, point 5), against the real `labsync webhooks
serve` process on a loopback port with a SQLite warehouse: a body nested 50,000 deep is refused
400 and nothing is stored; 200 half-sent POSTs are dropped after the body timeout (408, or 503
beyond the connection limit) while a normal delivery still gets stored; request heads that
trickle in are cut off; and downstream, a results document or a stored Rupa event nested too
deeply fails that one item, the others go through.

The receiver process runs `labsync webhooks serve` itself (etl.cli.main), with only the body and
head timeouts made short through their settings (LABSYNC_WEBHOOK_BODY_TIMEOUT,
LABSYNC_WEBHOOK_HEAD_TIMEOUT)."""

from __future__ import annotations

import json
import os
import secrets
import selectors
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest
import sqlalchemy as sa

from etl import asgi, warehouse
from etl.checkout import events, intents
from etl.orders.lifecycle import parse_event, track
from etl.orders.results import fetch_results
from etl.states import WebhookEventState
from etl.warehouse import rupa_orders, webhook_events
from etl.warehouse.tables import lgc_results
from etl.webhooks import store
from etl.webhooks.app import MAX_JSON_DEPTH
from tests.conftest import migrated
from tests.helpers import REPO
from tests.lifecycle_support import lgc, place_orders, quick
from tests.pgserver import wait_for
from tests.rupa_support import ledger, write_intents

DEPTH = 50_000
DEEP_ARRAYS = b"[" * DEPTH + b"]" * DEPTH
DEEP_OBJECTS = b'{"a":' * DEPTH + b"1" + b"}" * DEPTH
BODY_TIMEOUT = 1.0  # seconds, for these tests (the default is etl.webhooks.app.BODY_TIMEOUT)
HEAD_TIMEOUT = 1.0  # (etl.asgi.HEAD_TIMEOUT)
ORDER_EVENT = {"type": "order", "body": {"clientOrderId": "246975",
               "orderItemStatus": {"id": "2fa58516", "status": {"code": "KitRegistered"}},
               "timestamp": "2023-05-15T16:22:11.3513804Z"}}

# `labsync webhooks serve`, with the two timeouts short
LAUNCH = """
import os, sys
from etl import cli
port, body_timeout, head_timeout = sys.argv[1], sys.argv[2], sys.argv[3]
os.environ.update(LABSYNC_WEBHOOK_BODY_TIMEOUT=body_timeout, LABSYNC_WEBHOOK_HEAD_TIMEOUT=head_timeout)
sys.exit(cli.main(["webhooks", "serve", "--host", "127.0.0.1", "--port", port]))
"""


@dataclass
class Receiver:
    url: str
    port: int
    engine: sa.Engine

    def rows(self) -> list[dict]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.select(webhook_events).order_by(webhook_events.c.id))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(warehouse_url: str, logs_dir, **settings: str):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABSYNC_", "LGC_", "RUPA_"))}
    env.update(LABSYNC_WAREHOUSE_URL=warehouse_url, PYTHONPATH=str(REPO), **settings)
    with open(logs_dir / "receiver.out", "w") as out, open(logs_dir / "receiver.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCH, str(port), str(BODY_TIMEOUT), str(HEAD_TIMEOUT)],
                                env=env, cwd=REPO, stdout=out, stderr=err)
    url = f"http://127.0.0.1:{port}"
    engine = warehouse.connect(warehouse_url)

    def up() -> bool:
        try:
            return httpx.get(f"{url}/healthz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        assert wait_for(lambda: up() or proc.poll() is not None, timeout=30) and proc.poll() is None, \
            (logs_dir / "receiver.err").read_text()
        yield Receiver(url, port, engine)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        engine.dispose()


@pytest.fixture
def receiver(tmp_path):
    with serving(migrated(f"sqlite:///{tmp_path / 'warehouse.db'}"), tmp_path) as rx:
        yield rx


def _until_closed(socks: list[socket.socket], deadline: float) -> dict[socket.socket, tuple[float, bytes]]:
    """Read every socket until the server closes it (or `deadline`): socket -> (when, bytes)."""
    sel = selectors.DefaultSelector()
    got: dict[socket.socket, bytearray] = {}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        got[s] = bytearray()
    closed: dict[socket.socket, tuple[float, bytes]] = {}
    while len(closed) < len(socks) and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
            s = key.fileobj
            try:
                data = s.recv(65536)  # type: ignore[union-attr]
            except ConnectionResetError:
                data = b""
            if data:
                got[s] += data  # type: ignore[index]
            else:
                closed[s] = (time.monotonic(), bytes(got[s]))  # type: ignore[index]
                sel.unregister(s)
    sel.close()
    return closed


def _status(answer: bytes) -> int | None:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None


# ---- the receiver ----------------------------------------------------------------------------------
def test_a_body_nested_50000_deep_is_refused_400_and_nothing_is_stored(receiver):
    for source in ("lgc", "rupa"):
        for body in (DEEP_ARRAYS, DEEP_OBJECTS):
            r = httpx.post(f"{receiver.url}/webhooks/{source}", content=body,
                           headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and "nested too deeply" in r.json()["error"]

    def nested(depth: int) -> bytes:  # an object holding arrays: `depth` levels in all
        return b'{"type": "order", "x": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"

    assert httpx.post(f"{receiver.url}/webhooks/rupa", content=nested(MAX_JSON_DEPTH + 1)).status_code == 400
    assert receiver.rows() == []
    assert httpx.post(f"{receiver.url}/webhooks/rupa", content=nested(MAX_JSON_DEPTH)).status_code == 200
    assert httpx.post(f"{receiver.url}/webhooks/lgc", json=ORDER_EVENT).status_code == 200
    assert [r["event_type"] for r in receiver.rows()] == ["order", "order"]


def test_half_sent_posts_are_dropped_after_the_body_timeout_and_a_delivery_still_gets_stored(receiver):
    def half_sent() -> socket.socket:  # headers promising 1000 bytes, 12 of them sent, held open
        s = socket.create_connection(("127.0.0.1", receiver.port))
        s.sendall(b"POST /webhooks/lgc HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n" + b'{"type": "or')
        return s

    first = time.monotonic()
    socks: list[socket.socket] = []
    try:
        socks += [half_sent() for _ in range(90)]  # within the connection limit: waiting for their bodies
        assert httpx.get(f"{receiver.url}/healthz").status_code == 200  # (the server has taken them in)
        socks += [half_sent() for _ in range(110)]  # beyond it, most of these
        opened = time.monotonic()
        body = json.dumps(ORDER_EVENT).encode()
        status = None
        while time.monotonic() < opened + 5:  # retried as a vendor does (503: over the connection limit)
            try:
                status = httpx.post(f"{receiver.url}/webhooks/lgc", content=body, timeout=3).status_code
            except httpx.TransportError:
                status = None
            if status == 200:
                break
            time.sleep(0.1)
        assert status == 200, f"the delivery was not stored within 5 s (last answer {status})"
        (row,) = receiver.rows()
        assert bytes(row["body"]) == body

        closed = _until_closed(socks, deadline=opened + BODY_TIMEOUT + 4)
        assert len(closed) == len(socks), f"{len(socks) - len(closed)} half-sent connections still open"
        statuses = [_status(answer) for _, answer in closed.values()]
        assert set(statuses) == {408, 503}, set(statuses)  # dropped in time, or refused beyond the limit
        late = [when - first for when, answer in closed.values() if _status(answer) == 408]
        assert min(late) >= BODY_TIMEOUT * 0.8  # the body timeout dropped them, not anything earlier
        assert len(receiver.rows()) == 1  # nothing of the half-sent ones
        assert httpx.get(f"{receiver.url}/healthz").status_code == 200
    finally:
        for s in socks:
            s.close()


def test_request_heads_that_trickle_in_or_never_come_are_cut_off(receiver):
    silent = [socket.create_connection(("127.0.0.1", receiver.port)) for _ in range(10)]
    trickling = [socket.create_connection(("127.0.0.1", receiver.port)) for _ in range(10)]
    opened = time.monotonic()
    try:
        for s in trickling:
            s.sendall(b"POST /webhooks/lgc HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for i in range(int(HEAD_TIMEOUT / 0.2) + 3):  # a header line now and then
            time.sleep(0.2)
            for s in trickling:
                try:
                    s.sendall(b"X-Slow-%d: 1\r\n" % i)
                except OSError:
                    pass  # closed already
        closed = _until_closed(silent + trickling, deadline=opened + HEAD_TIMEOUT + 3)
        assert len(closed) == 20, f"{20 - len(closed)} connections still open"
        assert min(when for when, _ in closed.values()) - opened >= HEAD_TIMEOUT * 0.8
        # a head larger than the h11 limit is answered 400
        with socket.create_connection(("127.0.0.1", receiver.port)) as big:
            big.sendall(b"POST /webhooks/lgc HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
                        + b"a" * (asgi.MAX_HEAD_BYTES + 1024) + b"\r\n\r\n")
            (answer,) = [a for _, a in _until_closed([big], time.monotonic() + 5).values()]
        assert _status(answer) == 400
        assert httpx.post(f"{receiver.url}/webhooks/lgc", json=ORDER_EVENT).status_code == 200
    finally:
        for s in silent + trickling:
            s.close()


# ---- downstream: one unreadable item fails alone ---------------------------------------------------
@pytest.mark.parametrize("warehouse_url", ["sqlite"], indirect=True)
def test_a_results_document_nested_too_deeply_fails_that_order_alone(engine, settings, sandbox, monkeypatch):
    s = quick(settings)
    deep_order, good_order = place_orders(engine, s, 2)
    sb = lgc(sandbox).lifecycle
    for coid in (deep_order, good_order):
        sb.advance(coid, to="ResultsAvailable")
    track(engine, s)
    deep_items = {item.barcode: item.id for item in sb.orders[deep_order].items}
    real = sb.results_json
    monkeypatch.setattr(sb, "results_json", lambda item: DEEP_OBJECTS if item.barcode in deep_items else real(item))

    summary = fetch_results(engine, s)
    assert set(summary.failed) == set(deep_items.values()) and summary.exit_code == 1
    assert {reason for reason in summary.failed.values()} == {
        "the results document is nested too deeply to read; not stored"}
    with engine.connect() as conn:
        stored = {r.barcode: r.client_order_id for r in conn.execute(sa.select(lgc_results))}
    assert set(stored.values()) == {good_order} and summary.stored == len(stored) >= 1

    monkeypatch.setattr(sb, "results_json", real)  # LetsGetChecked fixes the document: the next run stores it
    later = fetch_results(engine, s)
    assert later.failed == {} and later.stored == len(deep_items)


@pytest.mark.parametrize("warehouse_url", ["sqlite"], indirect=True)
def test_a_rupa_event_nested_too_deeply_fails_alone_and_the_others_apply(engine, settings, rupa, tmp_path):
    path_secret = secrets.token_urlsafe(32)  # Rupa's deliveries authenticated by a capability path
    with serving(settings.warehouse_url, tmp_path, RUPA_WEBHOOK_PATH=path_secret) as rx:
        rupa.checkout.sender.configure(url=f"{rx.url}/webhooks/rupa/{path_secret}")
        deep = b'{"type": "order.updated", "data": ' + DEEP_ARRAYS + b"}"
        assert httpx.post(f"{rx.url}/webhooks/rupa/{path_secret}", content=deep).status_code == 400  # refused today
        # one stored before the receiver had a depth limit (or written by something else)
        deep_id, _ = store.store_event(engine, "rupa", deep, event_type="order.updated", authenticated=True)
        path = write_intents(tmp_path / "intents.csv", [{
            "row_id": "R1", "rupa_patient_id": "pat_0000004", "lab_test_ids": "labts_0000001",
            "return_url": "https://app.example/back"}])
        assert intents.process_intents_file(engine, settings, path).counts == {intents.CREATED: 1}
        oid = rupa.checkout.submit(ledger(engine)["R1"]["order_intent_id"])
        rupa.checkout.advance(oid, "In Progress")
        assert rupa.checkout.sender.flush()

        summary = events.apply_events(engine, settings)
    assert summary.events == {"applied": 2, "failed": 1}
    with engine.connect() as conn:
        failed = conn.execute(sa.select(webhook_events.c.id, webhook_events.c.error)
                              .where(webhook_events.c.state == WebhookEventState.FAILED)).one()
        status = conn.execute(sa.select(rupa_orders.c.status).where(rupa_orders.c.id == oid)).scalar_one()
    assert failed.id == deep_id and failed.error == "the body is nested too deeply to read"
    assert status == "In Progress" and ledger(engine)["R1"]["order_id"] == oid


def test_a_stored_lgc_event_nested_too_deeply_is_ignored_not_a_crash():
    from datetime import UTC, datetime

    event = store.Event(1, "lgc", "order", b'{"type": "order", "body": ' + DEEP_OBJECTS + b"}",
                        datetime.now(UTC), 0)
    parsed = parse_event(event)
    assert (parsed.kind, parsed.reason) == ("ignore", "not a JSON document")
