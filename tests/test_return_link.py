"""The checkout return link is signed (etl.returnlink): labsync gives Rupa a return_url with `sig`
over the row id, the receiver's `/webhooks/rupa/return` refuses (403, nothing stored) a link it
did not make, and applying a return never moves a row already linked to an order. End to end:
the sandbox's checkout redirects the practitioner to the real receiver, on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
import sqlalchemy as sa

from etl.checkout import events, intents
from etl.warehouse import webhook_events
from tests.rupa_support import ledger, write_intents


@pytest.fixture
def returns(engine, settings, rupa, receiver, tmp_path, monkeypatch):
    """A receiver that finds the warehouse's Fernet key where the CLI does (LABSYNC_FERNET_KEY),
    the same key the intents run signs with; rows R1 and R2 sent with return links to it."""
    monkeypatch.setenv("LABSYNC_FERNET_KEY", settings.fernet_key)
    server = receiver()
    rupa.checkout.sender.configure(url=None)  # no order events: only the returns tell
    back = f"{server.url}/webhooks/rupa/return"
    path = write_intents(tmp_path / "ret.csv", [
        {"row_id": r, "rupa_patient_id": "pat_0000004", "lab_test_ids": "", "return_url": f"{back}?row_id={r}"}
        for r in ("R1", "R2")])
    assert intents.process_intents_file(engine, settings, path).counts == {intents.CREATED: 2}
    return server  # .url; .rupa_url: where Rupa's (authenticated) deliveries go


def given_to_rupa(rupa, engine, row_id: str) -> str:
    """The return_url labsync gave Rupa for the row (as the sandbox holds it)."""
    intent_id = ledger(engine)[row_id]["order_intent_id"]
    return rupa.order_intents[intent_id]["attributes"]["return_url"]


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def stored(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(webhook_events)).scalar()


def linked(engine) -> dict[str, str | None]:
    return {r: row["order_id"] for r, row in ledger(engine).items()}


def checkout(rupa, engine, row_id: str) -> httpx.Response:
    """The practitioner submits the row's cart; the sandbox redirects to the return_url."""
    return httpx.post(ledger(engine)[row_id]["checkout_url"], data={"payer": "Practitioner"},
                      follow_redirects=True)


def test_the_genuine_return_links_the_row(engine, settings, rupa, returns):
    link = given_to_rupa(rupa, engine, "R1")
    assert set(query(link)) == {"row_id", "sig"} and query(link)["row_id"] == "R1"
    page = checkout(rupa, engine, "R1")
    assert page.status_code == 200 and "ord_000001" in page.text
    assert query(str(page.url)) == {**query(link), "order": "ord_000001"}
    events.apply_events(engine, settings)
    assert linked(engine) == {"R1": "ord_000001", "R2": None}


def test_forged_return_links_are_refused_and_change_nothing(engine, settings, rupa, returns):
    sig_r1 = query(given_to_rupa(rupa, engine, "R1"))["sig"]
    forged = [
        {"row_id": "R2", "order": "ord_ATTACKER"},  # no signature at all
        {"row_id": "R2", "sig": "", "order": "ord_ATTACKER"},
        {"row_id": "R2", "sig": sig_r1, "order": "ord_ATTACKER"},  # another row's signature
        {"row_id": "R2", "sig": sig_r1[:-2] + ("AA" if sig_r1[-2:] != "AA" else "BB"), "order": "ord_ATTACKER"},
        {"row_id": "R1x", "sig": sig_r1, "order": "ord_ATTACKER"},  # the row id altered
        {"row_id": "R2", "sig": "not base64 at all!", "order": "ord_ATTACKER"},
    ]
    for params in forged:
        answer = httpx.get(f"{returns.url}/webhooks/rupa/return?{urlencode(params)}")
        assert answer.status_code == 403, params
        assert "nothing was recorded" in answer.text and "ord_ATTACKER" not in answer.text
    assert stored(engine) == 0
    events.apply_events(engine, settings)
    assert linked(engine) == {"R1": None, "R2": None}


def test_a_second_return_does_not_relink_a_linked_row(engine, settings, rupa, returns, caplog):
    link = given_to_rupa(rupa, engine, "R1")
    assert checkout(rupa, engine, "R1").status_code == 200
    events.apply_events(engine, settings)
    assert linked(engine)["R1"] == "ord_000001"
    before = ledger(engine)["R1"]
    # the genuine link replayed with another order id (Rupa's `order=` is not signed)
    again = httpx.get(f"{link}&{urlencode({'order': 'ord_ATTACKER'})}")
    assert again.status_code == 200
    with caplog.at_level(logging.WARNING, logger="etl.checkout.events"):
        summary = events.apply_events(engine, settings)
    assert summary.events == {"applied": 1}
    assert ledger(engine)["R1"] == before  # not re-linked, not touched
    assert linked(engine) == {"R1": "ord_000001", "R2": None}
    conflict = [r.getMessage() for r in caplog.records if "left as it is" in r.getMessage()]
    assert conflict and "R1" in conflict[0] and "ord_ATTACKER" in conflict[0]


def test_a_return_naming_another_intents_order_does_not_link(engine, settings, rupa, returns):
    """R2's genuine link, with `order=` swapped for the order Rupa made from R1's cart (known
    from Rupa's own order event): R2 is left without an order."""
    rupa.checkout.sender.configure(url=returns.rupa_url)  # order events on
    order_r1 = rupa.checkout.submit(ledger(engine)["R1"]["order_intent_id"])
    assert rupa.checkout.sender.flush()
    events.apply_events(engine, settings)
    assert linked(engine) == {"R1": order_r1, "R2": None}
    link = given_to_rupa(rupa, engine, "R2")
    assert httpx.get(f"{link}&{urlencode({'order': order_r1})}").status_code == 200
    events.apply_events(engine, settings)
    assert linked(engine) == {"R1": order_r1, "R2": None}


def test_a_delivery_posing_as_a_return_is_refused(engine, settings, rupa, returns):
    """`labsync.*` event types are the receiver's own: posted where Rupa's deliveries go (even
    authenticated, by the capability path) one is refused and stored nowhere."""
    before = stored(engine)
    forged = httpx.post(returns.rupa_url, json={"type": "labsync.checkout_returned", "order": "ord_ATTACKER",
                                                "row_id": "R1"})
    assert forged.status_code == 400 and stored(engine) == before
    events.apply_events(engine, settings)
    assert linked(engine) == {"R1": None, "R2": None}
