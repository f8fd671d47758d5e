"""Results letters (issue 25): LetsGetChecked's Outreach API in the sandbox, the `outreach`
webhook applied like every event (a hint, confirmed by our own GET), the letters feed polled,
each PDF stored once, and the letters shown per order (program page, `labsync status`)."""

from __future__ import annotations

import asyncio
import hashlib
import json

import sqlalchemy as sa

from etl.lgc import outreach as api_outreach
from etl.lgc.orders_api import open_session
from etl.orders import lifecycle, outreach
from etl.program import page, report
from etl.warehouse.tables import lgc_outreach_letters, webhook_events
from tests.lifecycle_support import (  # noqa: F401
    WEBHOOK_KEY,
    lgc,
    place_orders,
    quick,
    receiver,
    run,
    send_webhooks_to,
)


def _letters(engine) -> dict[str, dict]:
    with engine.connect() as conn:
        return {r.letter_id: dict(r._mapping) for r in conn.execute(sa.select(lgc_outreach_letters))}


def _to_results(engine, s, sandbox, coids):
    life = lgc(sandbox).lifecycle
    for c in coids:
        life.advance(c, to="ResultsAvailable")
    lifecycle.track(engine, s, coids)
    return {c: life.item(c).barcode for c in coids}


def test_an_outreach_webhook_is_confirmed_by_a_get_and_its_letter_stored_once(engine, settings, sandbox):
    s = quick(settings)
    coids = place_orders(engine, s, 3, order_items="GLCS")
    barcodes = _to_results(engine, s, sandbox, coids)
    life = lgc(sandbox).lifecycle
    with receiver(engine) as rx:
        send_webhooks_to(sandbox, rx, duplicates=True)  # every event delivered twice
        life.send_letter(coids[0], "patient")
        life.send_letter(coids[0], "pcp")
        life.send_letter(coids[1], "patient")
        assert life.wait_idle()
    summary = lifecycle.apply_webhooks(engine, s)
    assert summary.failed == 0
    with engine.connect() as conn:
        events = conn.execute(sa.select(webhook_events.c.event_type, webhook_events.c.state,
                                        webhook_events.c.deliveries)).all()
    assert sorted(events) == [("outreach", "applied", 2)] * 3
    got = _letters(engine)
    assert set(got) == {f"patient_{barcodes[coids[0]]}", f"pcp_{barcodes[coids[0]]}", f"patient_{barcodes[coids[1]]}"}
    for letter_id, row in got.items():
        pdf = life.letter_pdf(letter_id)
        assert row["pdf"] == pdf and row["pdf_sha256"] == hashlib.sha256(pdf).hexdigest()
        assert row["status"] == "DeliverySent" and row["client_order_id"] in coids[:2]
    # stored once: applying again, polling the feed, storing again change nothing
    first = {k: (v["pdf_sha256"], v["pdf_fetched_at"]) for k, v in got.items()}
    lifecycle.apply_webhooks(engine, s)
    assert outreach.poll_feed(engine, s).pdfs == 0
    assert not outreach.store_pdf(engine, next(iter(got)), b"%PDF other bytes")
    assert {k: (v["pdf_sha256"], v["pdf_fetched_at"]) for k, v in _letters(engine).items()} == first
    # shown per order
    shown = outreach.letters_of(engine, coids)
    assert shown[coids[0]]["patient"] is not None and shown[coids[0]]["pcp"] is not None
    assert shown[coids[1]]["pcp"] is None and coids[2] not in shown
    assert outreach.describe(shown.get(coids[2])) == "patient not sent, PCP not sent"


def test_a_forged_outreach_event_stores_nothing_the_get_does_not_confirm(engine, settings, sandbox):
    s = quick(settings)
    coids = place_orders(engine, s, 1, order_items="GLCS")
    barcode = _to_results(engine, s, sandbox, coids)[coids[0]]
    from etl.webhooks import store

    forged = {"type": "outreach", "body": {"barcode": barcode, "type": "PcpResultsLetter", "status": "DeliverySent",
                                           "failureReason": None, "timestamp": "2026-01-01T00:00:00Z"}}
    unknown = {"type": "outreach", "body": {"barcode": "LGC-0000-0000-0001", "type": "PatientResultsLetter",
                                            "status": "DeliverySent", "timestamp": "2026-01-01T00:00:00Z"}}
    for doc in (forged, unknown):
        store.store_event(engine, "lgc", json.dumps(doc).encode(), content_type="application/json", event_type="outreach",
                          authenticated=True)
    lifecycle.apply_webhooks(engine, s)
    assert _letters(engine) == {}  # LetsGetChecked sent no PCP letter; the other barcode is nobody's
    with engine.connect() as conn:
        states = sorted(conn.execute(sa.select(webhook_events.c.state)).scalars())
    assert states == ["failed", "ignored"]


def test_the_letters_feed_is_walked_from_the_newest_stored_event(engine, settings, sandbox):
    s = quick(settings)
    coids = place_orders(engine, s, 5, order_items="GLCS")
    life = lgc(sandbox).lifecycle
    life.configure(letters="patient,pcp")  # letters go out by themselves at ResultsAvailable
    barcodes = _to_results(engine, s, sandbox, coids[:3])
    first = outreach.poll_feed(engine, s)
    assert first.letters == 6 and first.pdfs == 6 and not first.failed
    assert outreach.feed_cursor(engine) == 6
    barcodes.update(_to_results(engine, s, sandbox, coids[3:]))
    second = outreach.poll_feed(engine, s)
    assert second.letters == 4 and second.pdfs == 4
    got = _letters(engine)
    assert set(got) == {f"{a}_{barcodes[c]}" for c in coids for a in ("patient", "pcp")}
    assert {r["feed_event_id"] for r in got.values()} == set(range(1, 11))
    # the program page shows them per order
    [p] = report.build(engine, "Health4All")
    assert [r["client_order_id"] for r in p.letters] == sorted(coids)
    assert all(r["patient_letter_sent_at"] and r["pcp_letter_sent_at"] for r in p.letters)
    html = page.render(p)
    assert "patient letters sent: 5, PCP letters sent: 5" in html


def test_program_notifications_are_paged_with_the_continuation_token(engine, settings, sandbox):
    s = quick(settings)
    sandbox_lgc = lgc(sandbox)
    sandbox_lgc.OUTREACH_PAGE = 2  # small pages: the token has to be followed
    coids = place_orders(engine, s, 3, order_items="GLCS")
    sandbox_lgc.lifecycle.configure(letters="patient,pcp")
    _to_results(engine, s, sandbox, coids)

    async def listing():
        async with open_session(s) as session:
            api = await session.api()
            return await api_outreach.program_notifications(api, "Health4All"), session.requests

    found, requests = asyncio.run(listing())
    assert len(found) == 6 and len({n.letter_id for n in found}) == 6
    assert requests >= 3  # three pages of two


def test_labsync_status_shows_the_letters_of_an_order(engine, settings, sandbox, run):  # noqa: F811
    s = quick(settings)
    coids = place_orders(engine, s, 1, order_items="GLCS")
    lgc(sandbox).lifecycle.configure(letters="patient")
    _to_results(engine, s, sandbox, coids)
    outreach.poll_feed(engine, s)
    code, out, _ = run("status", coids[0], "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["letters"]["patient"] is not None and doc["letters"]["pcp"] is None
    code, out, _ = run("status", coids[0])
    flat = " ".join(out.replace("│", " ").split())
    assert code == 0 and "PCP not sent" in flat and "patient sent" in flat


def test_the_sandbox_sends_a_letter_on_command_over_http(engine, settings, sandbox):
    import httpx

    s = quick(settings)
    coids = place_orders(engine, s, 1, order_items="GLCS")
    base = sandbox.lgc_url.rsplit("/lgc", 1)[0]
    early = httpx.post(f"{base}/_sandbox/lgc/letter", json={"client_order_id": coids[0], "audience": "pcp"})
    assert early.status_code == 400 and "ResultsAvailable" in early.json()["error"]
    barcode = _to_results(engine, s, sandbox, coids)[coids[0]]
    sent = httpx.post(f"{base}/_sandbox/lgc/letter", json={"client_order_id": coids[0], "audience": "pcp"})
    assert sent.status_code == 200 and sent.json()["sent"]["barcode"] == barcode
    assert sent.json()["sent"]["type"] == "PcpResultsLetter" and sent.json()["sent"]["failureReason"] is None
    assert httpx.post(f"{base}/_sandbox/lgc/letter", json={"client_order_id": "NOPE"}).status_code == 404
