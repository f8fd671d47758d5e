"""Issue 13, points 1 and 2, as a program manager meets them: the summary page in headless
Chromium for a good, a partly bad, a corrected re-dropped and an unusable file (headline and
reconciliation checked, PNGs under .labsync/screenshots/ for a person to look at), and the fix
file's round trip: edited by a script the way a person would in Excel, dropped back, and only
its rows sent. Real inbox, real sandbox over HTTP, SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from etl import warehouse
from etl.intake import summary
from etl.orders import inbox
from tests.browser import chromium, screenshot, wait_for_element
from tests.helpers import EXAMPLES, seed_row, write_csv

SHOTS = Path(__file__).resolve().parent.parent / ".labsync" / "screenshots"


@pytest.fixture
def box(settings):
    settings = replace(settings, inbox_settle_seconds=0.0)
    paths = LocalInbox(Path(settings.inbox))
    return settings, paths, warehouse.connect(settings.warehouse_url)


class LocalInbox:
    """The inbox folder and its subfolders (these pages are looked at in a browser from disk)."""

    def __init__(self, root: Path) -> None:
        self.root, self.processed, self.failed = root, root / "processed", root / "failed"
        for folder in (self.root, self.processed, self.failed):
            folder.mkdir(parents=True, exist_ok=True)


def run(engine, settings) -> dict:
    (outcome,) = inbox.run_once(engine, settings).outcomes
    return outcome


def partly_bad(tmp: Path, *, fixed: bool = False) -> Path:
    """Five orders: three good (one with a note over two lines), two that Excel mangled."""
    rows = [seed_row(client_order_id="PM-1", note="first line\nsecond line"),
            seed_row(client_order_id="PM-2", phone_country_code="+1" if fixed else "1"),
            seed_row(client_order_id="PM-3"),
            seed_row(client_order_id="PM-4", postal_code="02134" if fixed else "2134", dob="1961-02-11" if fixed else "2/11/1961"),
            seed_row(client_order_id="PM-5")]
    return write_csv(tmp / "orders.csv", rows, columns=[*rows[0]], bom=True)


def excel_fixes(fix_file: Path, out: Path) -> Path:
    """What a person does in Excel: fix the cells the problems column names, leave everything
    else as it is (Excel keeps the `'` labsync put before `+1`), save as 'CSV UTF-8'."""
    with open(fix_file, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if "phone_country_code" in r["problems"]:
            r["phone_country_code"] = "+1"
        if "postal_code" in r["problems"]:
            r["postal_code"] = "02134"
        if "dob" in r["problems"]:
            r["dob"] = "1961-02-11"
    with open(out, "w", encoding="utf-8-sig", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\r\n")
        w.writeheader()
        w.writerows(rows)
    return out


def look(page: Path, name: str) -> tuple[str, str]:
    """The page in headless Chromium: its headline and reconciliation line; a PNG for people."""
    with chromium(height=1600) as browser:
        browser.get(page.as_uri())
        headline = wait_for_element(browser, "#headline").text
        found = [e.text for e in browser.find_elements("css selector", "#reconciliation")]
        screenshot(browser, SHOTS / f"{name}.png")
    return headline, found[0] if found else ""


def adds_up(text: str) -> bool:
    """`N rows in the file = a rejected + b accepted + ...`: the terms sum to N."""
    m = re.fullmatch(r"([\d,]+) rows in the file = (.*)", text)
    assert m, text
    terms = [int(t.split(" ", 1)[0].replace(",", "")) for t in m.group(2).split(" + ")]
    names = [t.split(" ", 1)[1] for t in m.group(2).split(" + ")]
    assert names == list(summary.PAGE_OUTCOMES)
    return sum(terms) == int(m.group(1).replace(",", ""))


def test_the_summary_of_a_good_a_partly_bad_a_corrected_and_an_unusable_file(box, sandbox, tmp_path, warehouse_url):
    settings, paths, engine = box
    db = "pg" if warehouse_url.startswith("postgresql") else "sqlite"

    shutil.copy(EXAMPLES / "orders.csv", paths.root / "good.csv")
    assert run(engine, settings)["status"] == "loaded"
    headline, rec = look(paths.processed / "good.summary.html", f"summary-good-{db}")
    assert headline == "All 10 rows went through — nothing to do."
    assert rec == "10 rows in the file = 0 rejected + 10 accepted + 0 conflict + 0 failed + 0 pending + 0 already settled"

    shutil.copy(partly_bad(tmp_path), paths.root / "orders.csv")
    assert run(engine, settings)["counts"]["accepted"] == 3
    page = paths.processed / "orders.summary.html"
    headline, rec = look(page, f"summary-partly-bad-{db}")
    assert headline == "2 of 5 rows need fixing — nothing was sent for them."
    assert rec == "5 rows in the file = 2 rejected + 3 accepted + 0 conflict + 0 failed + 0 pending + 0 already settled"
    html = page.read_text(encoding="utf-8")
    for link in ('href="orders.csv"', 'href="orders.fix.csv"', 'href="orders.rejects.csv"'):
        assert link in html  # relative: the reports sit beside the page
    assert "lost its &#39;+&#39;" in html and "lost its leading zero" in html
    assert "line 4" in html  # PM-2 is Excel row 3 but line 4 (the note spans two lines)

    # the whole file, corrected, dropped again: the three sent before are settled, not re-sent
    puts = dict(sandbox.sandbox.lgc.put_count)
    shutil.copy(partly_bad(tmp_path, fixed=True), paths.root / "orders corrected.csv")
    assert run(engine, settings)["status"] == "loaded"
    sent = {k for k, v in sandbox.sandbox.lgc.put_count.items() if v != puts.get(k)}
    assert sent == {"PM-2", "PM-4"}
    page = paths.processed / "orders corrected.summary.html"
    headline, rec = look(page, f"summary-corrected-{db}")
    assert headline == "All 5 rows went through — nothing to do."
    assert rec == "5 rows in the file = 0 rejected + 2 accepted + 0 conflict + 0 failed + 0 pending + 3 already settled"
    html = page.read_text(encoding="utf-8")
    assert "Rows already settled by an earlier batch" in html and all(f"PM-{i}" in html for i in (1, 3, 5))

    (paths.root / "european.csv").write_text("client_order_id;program_code\nX;Y\n", encoding="utf-8")
    assert run(engine, settings)["status"] == "unusable"
    headline, rec = look(paths.failed / "european.summary.html", f"summary-unusable-{db}")
    assert headline == "This file could not be used — nothing was sent." and rec == ""
    html = (paths.failed / "european.summary.html").read_text(encoding="utf-8")
    assert "CSV UTF-8 (comma delimited)" in html and "examples/orders.csv" in html
    for name in ("good", "partly-bad", "corrected", "unusable"):
        assert (SHOTS / f"summary-{name}-{db}.png").stat().st_size > 10_000


def test_the_fix_file_round_trip_sends_only_its_rows(box, sandbox, tmp_path):
    settings, paths, engine = box
    shutil.copy(partly_bad(tmp_path), paths.root / "orders.csv")
    first = run(engine, settings)
    assert first["counts"] == {"accepted": 3, "rejected before sending": 2}
    fix = paths.processed / "orders.fix.csv"
    assert fix.exists()
    first_page = (paths.processed / "orders.summary.html").read_text(encoding="utf-8")
    assert "5 rows in the file = 2 rejected + 3 accepted" in first_page

    puts = dict(sandbox.sandbox.lgc.put_count)
    excel_fixes(fix, paths.root / "orders.fix.csv")  # dropped back under its own name
    second = run(engine, settings)
    assert second["status"] == "loaded" and second["counts"] == {"accepted": 2, "rejected before sending": 0}
    sent = {k for k, v in sandbox.sandbox.lgc.put_count.items() if v != puts.get(k)}
    assert sent == {"PM-2", "PM-4"}
    body = sandbox.sandbox.lgc.orders["PM-2"]["body"]
    text = json.dumps(body)
    assert '"+1' in text and "'+1" not in text  # `'+1` in the fix file came back as +1
    page = (paths.processed / "orders.fix.2.summary.html").read_text(encoding="utf-8")
    assert "All 2 rows went through" in page
    assert "2 rows in the file = 0 rejected + 2 accepted + 0 conflict + 0 failed + 0 pending + 0 already settled" in page


def test_a_fix_file_beside_its_batch_is_a_report_not_a_batch(box):
    settings, paths, engine = box
    write_csv(paths.root / "orders.csv", [seed_row()])
    write_csv(paths.root / "orders.fix.csv", [seed_row(client_order_id="OTHER")])
    assert inbox.discover(inbox.open_inbox(settings)) == ["orders.csv"]
    (paths.root / "orders.csv").unlink()
    assert inbox.discover(inbox.open_inbox(settings)) == ["orders.fix.csv"]


def test_the_reconciliation_adds_up_for_every_outbox_state():
    from etl.states import OutboxState

    counts = {state: i + 1 for i, state in enumerate(OutboxState)}
    rejected_rows = 4
    total = sum(counts.values()) + rejected_rows
    page = summary.batch_page(file_name="x.csv", total_rows=total, rejected_rows=rejected_rows, counts=counts)
    line = re.search(r'<p id="reconciliation" class="">([^<]*)</p>', page).group(1)
    assert adds_up(line)
    for words in ("given up", "unconfirmed", "queued", "refused by LetsGetChecked"):
        assert words in page
    wrong = summary.batch_page(file_name="x.csv", total_rows=total + 1, rejected_rows=rejected_rows, counts=counts)
    assert "These counts do not add up" in wrong


def test_large_batches_get_capped_tables_pointing_to_the_csvs():
    rejected = [{"line": i, "excel_row": i, "client_order_id": f"R{i}", "column": "state", "value": "XX",
                 "reason": "bad"} for i in range(2, 400)]
    page = summary.batch_page(file_name="big.csv", total_rows=398, rejected_rows=398, counts={},
                              rejected=rejected, reports={"fix": "big.fix.csv", "rejects": "big.rejects.csv"},
                              max_rows=50)
    assert page.count("<tr>") <= 60
    assert "Showing the first 50 of 398; every one is in big.fix.csv and big.rejects.csv." in page
