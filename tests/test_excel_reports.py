"""Issue 13, points 2 and 3, file level: every CSV labsync writes opens right in Excel (UTF-8 BOM,
CRLF, formula-safe cells), the reject report gives the Excel row beside the file's line, the fix
file holds the rejected rows themselves and reads back as a batch, and the reasons recognise what
Excel does to a cell (and still reject it: nothing is guessed)."""

from __future__ import annotations

import csv

import pytest

from etl.errors import UnusableInputError
from etl.intake.csvsafe import read_rows
from etl.intake.validate import CsvValidation, fix_path_for, validate_file
from schemas.columns import is_phi
from tests.helpers import read_rejects, seed_row, write_csv

BOM = b"\xef\xbb\xbf"


def _check(tmp_path, rows, name="b.csv", **kw):
    path = write_csv(tmp_path / name, rows, **kw)
    v = CsvValidation(path, fix_path=fix_path_for(path))
    valid = [r for chunk in v.chunks() for r in chunk]
    return v, valid


def _fix_rows(path) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


# (column, what Excel made of the value, words the reason must hold)
EXCEL_HINTS = [
    ("phone_country_code", "1", ["lost its '+'", "e.g. +1", "Text"]),
    ("phone_country_code", "44", ["lost its '+'", "e.g. +44", "Text"]),
    ("dob", "2/11/1961", ["as Excel shows it", "M/D/YYYY", "YYYY-MM-DD", "does not guess", "Text"]),
    ("dob", "11.02.1961", ["as Excel shows it", "YYYY-MM-DD"]),
    # a PHI column: the reason never repeats the cell (issue 23), not even mended; the report's
    # value column and the fix file show it
    ("postal_code", "2134", ["lost its leading zero", "zeros back in front", "Text"]),
    ("pcp_postal_code", "7030", ["lost its leading zero", "07030"]),
    ("participant_id", "1.23457E+11", ["scientific notation", "type the full value again", "Text"]),
    ("insurance_policy_number", "9.87654E+14", ["scientific notation"]),
    ("phone_number", "5.55E+09", ["scientific notation"]),  # raw text, not the phone normalised
    ("physician_npi", "1.23457E+09", ["scientific notation"]),
    ("client_order_id", "1.23457E+11", ["scientific notation"]),
]


@pytest.mark.parametrize("column,value,words", EXCEL_HINTS, ids=[f"{c}={v}" for c, v, _ in EXCEL_HINTS])
def test_every_excel_hint_explains_and_still_rejects(tmp_path, column, value, words):
    row = seed_row(**{column: value})
    if column == "pcp_postal_code":
        row["pcp_id"] = "PCP1"  # the PCP block is filled in the seed row
    v, valid = _check(tmp_path, [row])
    assert valid == []  # rejected, never guessed
    rejects = read_rejects(v.result.rejects_path)
    (reject,) = [r for r in rejects if r["column"] == column]
    assert reject["value"] == value  # the cell as the file has it
    for w in words:
        assert w in reject["reason"], (w, reject["reason"])
    if is_phi(column):
        assert value not in reject["reason"] and value.lstrip("0") not in reject["reason"]


def test_the_same_values_written_right_pass(tmp_path):
    v, valid = _check(tmp_path, [seed_row(phone_country_code="+1", dob="1961-02-11", postal_code="02134",
                                          participant_id="123456789012")])
    assert len(valid) == 1 and v.result.rejects_path is None


@pytest.mark.parametrize("sep", [";", "\t"])
def test_a_file_saved_with_another_separator_says_how_to_save_it(tmp_path, sep):
    path = tmp_path / "european.csv"
    row = seed_row()
    path.write_text(sep.join(row) + "\n" + sep.join(row.values()) + "\n", encoding="utf-8")
    with pytest.raises(UnusableInputError) as exc:
        validate_file(path)
    text = str(exc.value)
    assert "comma-separated" in text and "CSV UTF-8 (comma delimited)" in text
    assert "examples/orders.csv" in text
    assert row["first_name"] not in text  # no cell of the file is echoed (PHI)


def test_reports_have_a_bom_crlf_and_the_excel_row(tmp_path):
    rows = [seed_row(client_order_id="A1", note="one\ntwo\nthree"),  # a note over three lines
            seed_row(client_order_id="A2", state="XX")]
    v, valid = _check(tmp_path, rows)
    assert [r["client_order_id"] for r in valid] == ["A1"]
    for path in (v.result.rejects_path, v.result.fix_path):
        data = path.read_bytes()
        assert data.startswith(BOM) and data.count(b"\r\n") >= 2 and b"\n" not in data.replace(b"\r\n", b"")
    (reject,) = read_rejects(v.result.rejects_path)
    assert (reject["line"], reject["row"]) == ("5", "3")  # header row 1, A1 row 2 over lines 2-4


def test_the_fix_file_holds_the_rejected_rows_with_their_original_columns_and_values(tmp_path):
    rows = [seed_row(client_order_id="OK1"),
            seed_row(client_order_id="BAD1", postal_code="2134", state="XX", first_name="Zoë"),
            seed_row(client_order_id="BAD2", phone_country_code="+1", race="=HYPERLINK(1)")]
    path = write_csv(tmp_path / "b.csv", rows, columns=[*rows[0]])  # the example's own header
    v = CsvValidation(path, fix_path=fix_path_for(path))
    v.run()
    assert v.result.fix_path == tmp_path / "b.fix.csv"
    with open(path, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f))
    with open(v.result.fix_path, encoding="utf-8-sig", newline="") as f:
        raw = list(csv.reader(f))
    assert raw[0] == ["problems", *header]
    assert not any(c.startswith(("=", "+", "-", "@")) for r in raw for c in r)  # formula-safe
    fixed = _fix_rows(v.result.fix_path)
    assert [r["client_order_id"] for r in fixed] == ["BAD1", "BAD2"]
    assert fixed[0]["problems"].startswith("row 3: ") and "postal_code" in fixed[0]["problems"] \
        and "state 'XX'" in fixed[0]["problems"]
    # original values, not normalised; Zoë survives (UTF-8 with BOM)
    assert fixed[0]["first_name"] == "Zoë" and fixed[0]["postal_code"] == "2134"
    assert fixed[1]["phone_country_code"] == "'+1" and fixed[1]["race"] == "'=HYPERLINK(1)"

    # dropped back untouched it is a batch like any other: `problems` ignored, prefixes stripped
    again = CsvValidation(v.result.fix_path, fix_path=fix_path_for(v.result.fix_path))
    valid = [r for chunk in again.chunks() for r in chunk]
    assert valid == [] and again.result.rejected_rows == 2
    got = {(r["client_order_id"], r["column"]): r["value"] for r in read_rows(again.result.rejects_path)}
    assert got[("BAD2", "race")] == "=HYPERLINK(1)" and ("BAD2", "phone_country_code") not in got
    # its own fix file has one problems column, with this round's problems
    refix = _fix_rows(again.result.fix_path)
    assert list(refix[0]).count("problems") == 1 and refix[0]["problems"].startswith("row 2: ")


def test_a_fixed_fix_file_goes_through_and_the_values_survive(tmp_path):
    rows = [seed_row(client_order_id="BAD1", postal_code="2134")]
    v, _ = _check(tmp_path, rows)
    fixed = _fix_rows(v.result.fix_path)
    fixed[0]["postal_code"] = "02134"  # what a person types, the column formatted as Text
    out = tmp_path / "orders.fix.csv"
    with open(out, "w", encoding="utf-8-sig", newline="") as f:  # Excel's "CSV UTF-8"
        w = csv.DictWriter(f, fieldnames=list(fixed[0]), lineterminator="\r\n")
        w.writeheader()
        w.writerows(fixed)
    again = CsvValidation(out)
    (row,) = [r for chunk in again.chunks() for r in chunk]
    assert "problems" not in row and row["postal_code"] == "02134" and row["phone_country_code"] == "+1"


def test_a_row_with_the_wrong_number_of_cells_goes_to_the_fix_file_as_it_is(tmp_path):
    path = write_csv(tmp_path / "b.csv", [seed_row(client_order_id="OK")])
    with open(path, "a", encoding="utf-8") as f:
        f.write("SHORT,Health4All,P9\n")
    v = CsvValidation(path, fix_path=fix_path_for(path))
    v.run()
    with open(v.result.fix_path, encoding="utf-8-sig", newline="") as f:
        raw = list(csv.reader(f))
    assert raw[1][1:] == ["SHORT", "Health4All", "P9"] and "values but the header has" in raw[1][0]


def test_no_fix_file_unless_asked_and_a_stale_one_is_removed(tmp_path):
    path = write_csv(tmp_path / "b.csv", [seed_row(state="XX")])
    assert validate_file(path).fix_path is None and not fix_path_for(path).exists()
    v = CsvValidation(path, fix_path=fix_path_for(path))
    v.run()
    assert fix_path_for(path).exists()
    write_csv(path, [seed_row()])
    v = CsvValidation(path, fix_path=fix_path_for(path))
    v.run()
    assert v.result.fix_path is None and not fix_path_for(path).exists()
