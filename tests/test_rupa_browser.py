"""The whole Rupa Checkout flow as a practitioner sees it, in headless Chromium (Debian's):
open the checkout link from the intents file's summary page, submit the sandbox checkout,
land on labsync's return page, and see the order arrive in the warehouse through events."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import sqlalchemy as sa
from selenium.webdriver.support.ui import Select

from etl.checkout import events, intents
from etl.warehouse import rupa_orders
from tests.browser import chromium, screenshot, wait_for_element, wait_until
from tests.pgserver import wait_for
from tests.rupa_support import ledger, write_intents


def test_a_practitioner_checks_out_from_the_summary_and_the_order_arrives(engine, settings, rupa, receiver, tmp_path):
    server = receiver()
    path = write_intents(tmp_path / "clinic.csv", [
        {"row_id": "B1", "rupa_patient_id": "pat_0000002", "lab_test_ids": "labts_0000001;labts_0000002",
         "return_url": f"{server.url}/webhooks/rupa/return?row_id=B1"},
        {"row_id": "B2", "first_name": "Annie", "last_name": "Easley", "email": "ae@example.test",
         "lab_test_ids": "labts_0000003", "return_url": f"{server.url}/webhooks/rupa/return?row_id=B2"},
    ])
    out = intents.process_intents_file(engine, settings, path)
    assert out.counts == {intents.CREATED: 2}
    cart = ledger(engine)["B2"]

    with chromium() as browser:
        browser.get((tmp_path / "clinic.summary.html").as_uri())
        rows = browser.find_elements("css selector", "#checkout tbody tr")
        assert len(rows) == 2 and "Annie Easley" in rows[1].text
        screenshot(browser, tmp_path / "summary.png")
        link = rows[1].find_element("css selector", "a.checkout")
        assert link.get_attribute("href") == cart["checkout_url"]
        link.click()  # opens the checkout in a new tab, as the summary asks
        wait_until(browser, lambda d: len(d.window_handles) == 2)
        browser.switch_to.window(browser.window_handles[-1])
        wait_for_element(browser, "#submit-order")
        assert cart["order_intent_id"] in browser.find_element("css selector", "#intent").text
        Select(browser.find_element("css selector", "#payer")).select_by_visible_text("Practitioner")
        browser.find_element("css selector", "#submit-order").click()
        order_id = wait_for_element(browser, "#order").text  # labsync's return page
        assert browser.current_url.startswith(f"{server.url}/webhooks/rupa/return?row_id=B2&sig=")
        assert "&order=" in browser.current_url
        screenshot(browser, tmp_path / "returned.png")
    if os.environ.get("LABSYNC_SCREENSHOTS"):  # to look at them: LABSYNC_SCREENSHOTS=dir pytest ...
        for name in ("summary.png", "returned.png"):
            shutil.copy(tmp_path / name, Path(os.environ["LABSYNC_SCREENSHOTS"]) / name)

    assert order_id.startswith("ord_")
    assert wait_for(lambda: rupa.checkout.sender.flush(0) and rupa.checkout.sender.delivered, timeout=30)
    summary = events.apply_events(engine, settings)
    assert summary.events == {"applied": 2}  # the order.updated event and the return
    with engine.connect() as conn:
        order = conn.execute(sa.select(rupa_orders).where(rupa_orders.c.id == order_id)).mappings().one()
    assert order["status"] == "Pending Payment" and order["payer"] == "Practitioner"
    assert order["order_intent_id"] == cart["order_intent_id"] and order["patient_id"] == cart["patient_id"]
    assert ledger(engine)["B2"]["order_id"] == order_id and ledger(engine)["B1"]["order_id"] is None
