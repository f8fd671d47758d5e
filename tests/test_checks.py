"""etl.intake.checks runs a contract's pandera schema without pandera's validate(); these tests
hold it to pandera's own answer: on chunks that break every rule of both contracts, the failures
(line, column, check) are exactly those of `schema.validate(frame, lazy=True)`."""

from __future__ import annotations

import pandas as pd
import pandera.errors
import pandera.pandas as pa
import pytest

from etl.intake import checks
from etl.intake.validate import CsvValidation
from schemas.order_batch import SCHEMA
from schemas.order_intents import CONTRACT as INTENTS
from tests.helpers import seed_row, write_csv
from tests.test_contract_rules import CASES


def frames_of(path, **kw) -> list[pd.DataFrame]:
    """The chunks exactly as the validator checks them (read, trimmed, normalised)."""
    v = CsvValidation(path, chunk_rows=7, **kw)
    return [v._frame(block) for block in v._reader.blocks()]


def by_pandera(schema, frame) -> set[tuple]:
    try:
        schema.validate(frame, lazy=True)
        return set()
    except pandera.errors.SchemaErrors as exc:
        cases = exc.failure_cases
    got = set()
    for case in cases.itertuples(index=False):
        check = str(case.check).split("(", 1)[0]  # built-ins read e.g. "str_length(None, 35)"
        assert not check.startswith("dtype"), case  # Arrow-backed text throughout
        column = None if case.schema_context == "DataFrameSchema" else case.column
        got.add((None if pd.isna(case.index) else int(case.index), column, check))
    return got


def by_checks(schema, frame) -> set[tuple]:
    return {(None if line is None else int(line), column, check)
            for line, column, check in checks.failures(schema, frame)}


def test_every_order_batch_rule_fails_exactly_as_pandera_says(tmp_path):
    rows = [seed_row(**bad) for _rule, _good, bad, _column, _words in CASES]
    rows += [seed_row(**good) for _rule, good, _bad, _column, _words in CASES]
    rows += [
        seed_row(first_name="", participant_id="1.23E+11", gender=""),  # required cells empty
        seed_row(**{"custom.visit": "v" * 501}),  # a custom column's limit (a regex column)
        seed_row(address_line2="", email="", state="", country=""),  # nullable columns empty
        seed_row(client_order_id="A/B", postal_code="1234X", pcp_postal_code="2110"),
    ]
    columns = [*seed_row(), "custom.visit", "custom.note"]
    path = write_csv(tmp_path / "every_rule.csv", [{"custom.note": "", **r} for r in rows], columns=columns)
    frames = frames_of(path)
    assert sum(len(f) for f in frames) == len(rows) and len(frames) > 1
    found = set()
    for frame in frames:
        expected = by_pandera(SCHEMA, frame)
        assert by_checks(SCHEMA, frame) == expected
        found |= {check for _line, _column, check in expected}
    # the comparison covered every kind of rule the model states
    assert {"not_nullable", "str_length", "isin", "path_safe_id", "us_zip", "past_date", "npi",
            "order_items_format", "email_format", "phone_number_format", "phone_country_code_format",
            "not_scientific", "pcp_full_name", "requires:physician_npi", "requires:pcp_id",
            "requires:insurance_plan_name"} <= found


def test_every_intents_rule_fails_exactly_as_pandera_says(tmp_path):
    path = tmp_path / "intents.csv"
    path.write_text(
        "row_id,rupa_patient_id,first_name,last_name,email,birthday,lab_test_ids,return_url,metadata.x\n"
        "R1,patient-7,,,,,labts_1,https://a.example,m\n"
        "R2,,Ada,Lovelace,not-an-email,1815-13-10,lab_1,www.example.com,\n"
        "R3,,Ada,,,,,https://a.example,\n"
        ",pat_1,,,,,,https://a.example,\n"
        f"{'x' * 101},pat_1,,,,,,https://a.example,\n"
        "R6,pat_1,,,,2999-01-01,labts_a;labts_b,https://a.example,\n", encoding="utf-8")
    for frame in frames_of(path, contract=INTENTS):
        expected = by_pandera(INTENTS.schema, frame)
        assert expected and by_checks(INTENTS.schema, frame) == expected


def test_checks_follow_pandera_on_missing_cells_element_wise_checks_and_empty_rows():
    """Rules of pandera this module re-implements: a check skips missing cells unless told
    otherwise, element-wise checks see one value at a time, a dataframe check passes a row with
    nothing in it, a check answering one bool for the whole column fails without a row."""
    schema = pa.DataFrameSchema(
        {
            "a": pa.Column(str, nullable=True, checks=[
                pa.Check(lambda v: v.startswith("x"), element_wise=True, name="starts_x"),
                pa.Check(lambda s: s.notna(), ignore_na=False, name="sees_missing"),
            ]),
            "b": pa.Column(str, nullable=False, checks=pa.Check(lambda s: s.str.len().max() < 3, name="short")),
            "^c_": pa.Column(str, nullable=True, regex=True, checks=pa.Check.isin(["ok"])),
        },
        checks=[pa.Check(lambda df: df["a"].notna(), name="needs_a")],
    )
    frame = pd.DataFrame({"a": ["x1", "y2", None, None], "b": ["ab", None, "abcd", None],
                          "c_1": ["ok", "no", None, None], "c_2": [None, None, "bad", None]},
                         index=[10, 11, 12, 13], dtype="str")
    got = by_checks(schema, frame)
    assert got == by_pandera(schema, frame)
    assert (11, "a", "starts_x") in got and (12, "a", "sees_missing") in got
    assert (None, "b", "short") in got and (11, "b", "not_nullable") in got
    assert (11, "c_1", "isin") in got and (12, "c_2", "isin") in got
    assert (12, None, "needs_a") in got and (13, None, "needs_a") not in got  # row 13 is empty


def test_a_rule_the_validator_cannot_run_per_chunk_is_refused():
    unique = pa.DataFrameSchema({"a": pa.Column(str, unique=True)})
    with pytest.raises(ValueError, match="uniqueness"):
        list(checks.failures(unique, pd.DataFrame({"a": ["x", "x"]}, dtype="str")))
