"""The order-intents CSV contract (schemas/order_intents.py) through the one validator: the same
reporting as order batches (lines, plain reasons, rejects file), no warehouse needed."""

from __future__ import annotations

import csv

import pytest

from etl.errors import UnusableInputError
from etl.intake.validate import CsvValidation
from schemas.order_intents import CONTRACT


def validate(tmp_path, text: str, **kw):
    path = tmp_path / "intents.csv"
    path.write_text(text, encoding="utf-8-sig")
    v = CsvValidation(path, contract=CONTRACT, **kw)
    rows = [r for chunk in v.chunks() for r in chunk]
    rejects = []
    if v.result.rejects_path:
        with open(v.result.rejects_path, encoding="utf-8-sig", newline="") as f:
            rejects = list(csv.DictReader(f))
    return rows, rejects, v.result


def test_valid_rows_are_trimmed_normalised_and_carry_metadata(tmp_path):
    rows, rejects, result = validate(tmp_path, (
        " Row_ID , RETURN_URL ,lab_test_ids, metadata.Visit ,rupa_patient_id\n"
        " R1 , https://app.example/done , labts_a ;labts_b; ,  v1 ,pat_1\n"
        "\n"
        "R2,https://app.example/done,,,pat_2\n"))
    assert rejects == [] and (result.total_rows, result.valid_rows) == (2, 2)
    assert rows[0] == {"line": 2, "row_id": "R1", "return_url": "https://app.example/done",
                       "lab_test_ids": "labts_a;labts_b", "metadata.Visit": "v1", "rupa_patient_id": "pat_1",
                       "first_name": None, "last_name": None, "email": None, "birthday": None}
    assert rows[1]["line"] == 4 and rows[1]["lab_test_ids"] is None


def test_every_problem_gets_a_line_and_a_plain_reason(tmp_path):
    _, rejects, result = validate(tmp_path, (
        "row_id,rupa_patient_id,first_name,last_name,email,birthday,lab_test_ids,return_url\n"
        "R1,patient-7,,,,,labts_1,https://a.example\n"
        "R2,,Ada,Lovelace,not-an-email,1815-13-10,lab_1,www.example.com\n"
        "R3,,Ada,,,,,https://a.example\n"
        "R1,pat_1,,,,,,https://a.example\n"
        ",pat_1,,,,,,https://a.example\n"
        "R6,pat_1,,,,,,https://a.example,extra\n"
        f"{'x' * 101},pat_1,,,,,,https://a.example\n"))
    got = {(int(r["line"]), r["column"]): r["reason"] for r in rejects}
    assert got[(2, "rupa_patient_id")] == "rupa_patient_id 'patient-7' is not a Rupa patient id (pat_…)"
    # PHI columns (schemas.order_intents.PHI): the reason names the column and the rule, never the
    # cell (issue 23); the report's value column has it
    assert got[(3, "email")] == "email is not an email address"
    assert got[(3, "birthday")] == "birthday is not a real calendar date"
    assert {(r["column"], r["value"]) for r in rejects if r["line"] == "3"} >= {
        ("email", "not-an-email"), ("birthday", "1815-13-10")}
    assert "'lab_1': not a Rupa lab test id" in got[(3, "lab_test_ids")]
    assert got[(3, "return_url")].startswith("return_url 'www.example.com' is not a web address")
    assert got[(4, "last_name")].startswith("last_name is required when rupa_patient_id is empty")
    assert (4, "email") in got and (4, "first_name") not in got
    assert got[(5, "row_id")] == "row_id 'R1' already appears on line 2; each row needs its own id"
    assert got[(6, "row_id")] == "row_id is required but empty"
    assert got[(7, "(row)")].startswith("line has 9 values but the header has 8 columns")
    assert got[(8, "row_id")] == "row_id is 101 characters; at most 100 are allowed"
    assert [r["row_id"] for r in rejects if r["line"] == "5"] == ["R1"]
    assert (result.valid_rows, result.rejected_rows) == (0, 7)


@pytest.mark.parametrize("header, message", [
    ("row_id,lab_test_ids\n", "required column missing: return_url"),
    ("row_id,return_url,client_order_id\n", "unknown column 'client_order_id'"),
    ("row_id,return_url,retrun_url\n", "did you mean 'return_url'?"),
    ("row_id;return_url\n", "separated by .;. .semicolons. but labsync reads comma-separated files"),
])
def test_unusable_headers(tmp_path, header, message):
    with pytest.raises(UnusableInputError, match=message):
        validate(tmp_path, header + "R1,https://a.example\n")


def test_an_intents_file_dropped_among_order_batches_says_where_it_belongs(tmp_path):
    path = tmp_path / "oops.csv"
    path.write_text("row_id,rupa_patient_id,return_url\nR1,pat_1,https://a.example\n")
    with pytest.raises(UnusableInputError, match="Rupa order-intents file.*intents/ folder"):
        CsvValidation(path)
