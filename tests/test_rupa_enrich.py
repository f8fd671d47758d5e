"""Rupa-linked order rows: blank patient cells filled from the extracted copy, typed values kept,
unknown or deleted ids a reject reason."""

from __future__ import annotations

import pytest

from etl.extract.streams import extract_stream
from etl.intake.validate import CsvValidation
from etl.orders.enrich import make_rupa_lookup
from tests.helpers import read_rejects, seed_row, write_csv
from tests.rupa_support import with_rupa


@pytest.fixture
def extracted(engine, settings, sandbox):
    rupa = sandbox.sandbox.rupa
    settings = with_rupa(settings, api_token=rupa.mint_access_token(), page_size=25)
    extract_stream(engine, settings, "patients")
    rupa.delete_patient("pat_0000009")
    extract_stream(engine, settings, "patients")  # marks it deleted in the warehouse
    return rupa


def test_lookup_returns_known_live_patients_only(engine, extracted):
    lookup = make_rupa_lookup(engine)
    api = extracted.patient("pat_0000004")["attributes"]
    got = lookup(["pat_0000004", " pat_0000004 ", "pat_0000009", "pat_unknown", ""])
    assert got == {"pat_0000004": {"first_name": api["first_name"], "last_name": api["last_name"],
                                   "email": api["email"], "dob": api["birthday"]}}
    assert lookup([]) == {}
    assert len(lookup([f"pat_{i:07d}" for i in range(50)])) == 49


def test_validator_fills_blanks_keeps_typed_values_and_rejects_unknown_ids(engine, extracted, tmp_path):
    rows = [
        seed_row(client_order_id="A1", rupa_patient_id="pat_0000001", first_name="", last_name="", email="", dob=""),
        seed_row(client_order_id="A2", rupa_patient_id="pat_0000002", first_name="Typed", last_name="", dob=""),
        seed_row(client_order_id="A3", rupa_patient_id="pat_missing", first_name="", last_name="", dob=""),
        seed_row(client_order_id="A4", rupa_patient_id="", first_name="Walk", last_name="In", dob="1990-01-01"),
        seed_row(client_order_id="A5", rupa_patient_id="pat_0000009", first_name="", last_name="", dob=""),
    ]
    validation = CsvValidation(write_csv(tmp_path / "b.csv", rows), rupa_lookup=make_rupa_lookup(engine))
    valid = {r["client_order_id"]: r for chunk in validation.chunks() for r in chunk}

    one = extracted.patient("pat_0000001")["attributes"]
    two = extracted.patient("pat_0000002")["attributes"]
    assert [valid["A1"][c] for c in ("first_name", "last_name", "email", "dob")] == [
        one["first_name"], one["last_name"], one["email"], one["birthday"]]
    assert valid["A2"]["first_name"] == "Typed" and valid["A2"]["last_name"] == two["last_name"]
    assert valid["A4"]["first_name"] == "Walk"
    rejects = {r["client_order_id"]: r for r in read_rejects(validation.result.rejects_path)}
    assert set(rejects) == {"A3", "A5"}  # unknown id; id of a patient Rupa deleted
    assert all(r["column"] == "rupa_patient_id" and "labsync extract patients" in r["reason"] for r in rejects.values())
