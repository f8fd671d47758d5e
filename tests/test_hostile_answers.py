"""Issue 10, point 3: a 2xx is `accepted` only when its body is the documented order; anything
else is `unconfirmed` (never counted as accepted, sent again on a later run). Answer bodies are
read as a stream under a size cap, so an endless answer never sits in memory."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest
from starlette.responses import JSONResponse, Response, StreamingResponse

from etl.orders.load import load_rows
from tests.test_lgc_support import fast, ledger, order_row

COID = "ORD-00001"


def _order(coid: str = COID, items=None) -> dict:
    return {"clientOrderId": coid, "participantId": "P00001",
            "orderItems": items if items is not None else [{"code": "GLCS", "id": "3fa85f64"}]}


# (name, status, media type, body): 2xx answers that are not the documented order
NOT_AN_ORDER = [
    ("html maintenance page", 200, "text/html", b"<html><body>Down for maintenance</body></html>"),
    ("invalid json", 202, "application/json", b'{"clientOrderId": "ORD-00001", "orderItems": ['),
    ("no orderItems", 200, "application/json", json.dumps({"clientOrderId": COID}).encode()),
    ("empty orderItems", 200, "application/json", json.dumps(_order(items=[])).encode()),
    ("an item without id", 201, "application/json",
     json.dumps(_order(items=[{"code": "GLCS"}])).encode()),
    ("an item with an empty id", 202, "application/json",
     json.dumps(_order(items=[{"code": "GLCS", "id": ""}])).encode()),
    ("items not objects", 202, "application/json", json.dumps(_order(items=["x"])).encode()),
    ("another order", 202, "application/json", json.dumps(_order("ORD-99999")).encode()),
    ("no clientOrderId", 202, "application/json",
     json.dumps({"orderItems": [{"code": "GLCS", "id": "1"}]}).encode()),
    ("a json array", 200, "application/json", b"[]"),
    ("json null", 200, "application/json", b"null"),
    ("empty 200", 200, "application/json", b""),
    ("204 no content", 204, None, b""),
]


def _answer(status: int, media_type: str | None, body: bytes):
    return lambda request, raw: Response(body, status_code=status, media_type=media_type)


@pytest.mark.parametrize("name,status,media_type,body", NOT_AN_ORDER, ids=[c[0] for c in NOT_AN_ORDER])
def test_a_2xx_without_the_order_is_never_accepted(lite_engine, lite_settings, sandbox, name, status, media_type, body):
    engine, settings = lite_engine, lite_settings
    lgc = sandbox.sandbox.lgc
    lgc.answers[COID] = _answer(status, media_type, body)
    summary = load_rows(engine, fast(settings), [order_row(1)])
    assert summary.counts == {"unconfirmed": 1} and summary.exit_code == 1
    row = ledger(engine)[COID]
    assert row["state"] == "unconfirmed" and row["http_status"] == status
    assert row["order_item_ids"] is None and row["claimed_by"] is None
    assert "not" in row["last_error"] and "sent again" in row["last_error"]

    # checked again later: the next run re-sends it (safe: the PUT is idempotent)
    del lgc.answers[COID]
    again = load_rows(engine, fast(settings), [order_row(1)])
    assert again.counts == {"accepted": 1} and again.sent == 1
    row = ledger(engine)[COID]
    assert row["state"] == "accepted" and row["order_item_ids"] == lgc.orders[COID]["response"]["orderItems"]


@pytest.mark.parametrize("status", [200, 201, 202])
def test_the_documented_order_is_accepted_with_its_ids(lite_engine, lite_settings, sandbox, status):
    engine, settings = lite_engine, lite_settings
    items = [{"code": "GLCS", "id": "id-1"}, {"code": "FCIT", "id": "id-2"}]
    sandbox.sandbox.lgc.answers[COID] = lambda request, raw: JSONResponse(_order(items=items), status_code=status)
    summary = load_rows(engine, fast(settings), [order_row(1)])
    assert summary.counts == {"accepted": 1}
    assert ledger(engine)[COID]["order_item_ids"] == items


def _endless(status: int, produced: list[int], total: int = 64 << 20):
    chunk = b" " * (64 << 10)

    async def body():
        sent = 0
        while sent < total:
            produced.append(len(chunk))
            sent += len(chunk)
            yield chunk
            await asyncio.sleep(0)  # a checkpoint: the server notices when the client hangs up

    return lambda request, raw: StreamingResponse(body(), status_code=status, media_type="application/json")


@pytest.mark.parametrize("status,state", [(202, "unconfirmed"), (400, "rejected"), (404, "failed")])
def test_an_oversized_answer_is_cut_off_with_a_plain_reason(lite_engine, lite_settings, sandbox, status, state):
    engine, settings = lite_engine, lite_settings
    produced: list[int] = []
    sandbox.sandbox.lgc.answers[COID] = _endless(status, produced)
    summary = load_rows(engine, fast(settings), [order_row(1)])
    assert summary.counts == {state: 1}
    row = ledger(engine)[COID]
    assert row["http_status"] == status and "larger than" in row["last_error"] and "MiB" in row["last_error"]
    # the client stopped reading near the 1 MiB cap instead of taking in the whole 64 MiB
    assert sum(produced) < 16 << 20


def test_unconfirmed_rows_keep_a_batch_incomplete_and_are_resent_when_dropped_again(settings, sandbox, engine):
    from etl.orders import inbox
    from tests.test_lgc_support import csv_row, write_csv

    box = settings.inbox
    box.mkdir(parents=True)
    lgc = sandbox.sandbox.lgc
    lgc.answers["ORD-00002"] = _answer(200, "text/html", b"<html>proxy login</html>")
    write_csv(box / "b.csv", [csv_row(i) for i in range(1, 4)])
    (out,) = inbox.run_once(engine, replace(settings, inbox_settle_seconds=0.0)).outcomes
    assert out["status"] == "incomplete" and out["counts"]["unconfirmed"] == 1
    page = (box / "processed" / "b.summary.html").read_text(encoding="utf-8")
    assert "ORD-00002" in page and "unconfirmed" in page

    lgc.answers.clear()
    (box / "processed" / "b.csv").rename(box / "b-again.csv")
    (again,) = inbox.run_once(engine, replace(settings, inbox_settle_seconds=0.0)).outcomes
    assert again["status"] == "loaded" and again["counts"].get("accepted") == 3
    assert lgc.put_count["ORD-00002"] == 2 and lgc.put_count["ORD-00001"] == 1


def test_dry_run_and_status_treat_unconfirmed_like_failed(engine, settings, sandbox):
    from etl.orders import ledger as ledger_mod
    from tests.test_lgc_support import put_item

    sandbox.sandbox.lgc.answers[COID] = _answer(200, "text/html", b"<html></html>")
    load_rows(engine, fast(settings), [order_row(1)])
    known = ledger_mod.lookup(engine, [COID])
    assert ledger_mod.would_send(known[COID], put_item(order_row(1)).sha256)


def test_an_unconfirmed_order_is_checked_by_GET_and_confirmed_without_a_second_PUT(lite_engine, lite_settings, sandbox):
    """Issue 10 point 3 with the lifecycle work (issue 11): `labsync track` (and the DAG's sweep)
    GETs `unconfirmed` orders; one LetsGetChecked holds becomes accepted in the ledger and in the
    batch's outbox, one it does not hold stays unconfirmed and is PUT again by the next load."""
    from etl.orders import outbox
    from etl.orders.lifecycle import track

    engine, settings = lite_engine, fast(lite_settings)
    lgc = sandbox.sandbox.lgc
    held, lost = "ORD-00001", "ORD-00002"

    def swallowed(request, raw):  # the vendor stored the order; a proxy ate its answer
        del lgc.answers[held]
        lgc._put(request, request.path_params["client_id"], held, raw)
        return Response(b"<html>proxy</html>", status_code=200, media_type="text/html")

    lgc.answers[held] = swallowed
    lgc.answers[lost] = _answer(200, "text/html", b"<html>proxy</html>")  # never stored
    first = load_rows(engine, settings, [order_row(1), order_row(2)])
    assert first.counts == {"unconfirmed": 2}
    assert lgc.accepted_count[held] == 1 and lgc.accepted_count[lost] == 0
    lgc.answers.clear()

    summary = track(engine, settings)
    assert summary.orders == 2 and summary.confirmed == 1 and summary.not_found == [lost]
    book = ledger(engine)
    assert book[held]["state"] == "accepted" and book[held]["order_item_ids"]
    assert "confirmed by GET order" in book[held]["last_error"]
    assert book[lost]["state"] == "unconfirmed"
    (batch_id,) = {r["batch_id"] for r in book.values()}
    rows = {r["client_order_id"]: r for r in outbox.rows_of(engine, batch_id)}
    assert rows[held]["state"] == "accepted" and rows[lost]["state"] == "unconfirmed"

    again = load_rows(engine, settings, [order_row(1), order_row(2)], batch_id=batch_id)
    assert again.counts.get("accepted") == 1  # only the lost one went out again
    assert lgc.put_count[held] == 1 and lgc.put_count[lost] == 2
