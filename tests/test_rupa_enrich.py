"""Rupa-linked order rows: blank patient cells filled from the extracted copy, typed values kept,
unknown or deleted ids a reject reason."""

from __future__ import annotations

import pandas as pd
import pytest

from etl.rupa.enrich import enrich_frame, make_rupa_lookup
from etl.rupa.extract import extract_stream
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


def test_enrich_fills_blanks_keeps_typed_values_and_rejects_unknown_ids(engine, extracted):
    frame = pd.DataFrame({
        "client_order_id": ["A1", "A2", "A3", "A4", "A5"],
        "rupa_patient_id": ["pat_0000001", "pat_0000002", "pat_missing", "", "pat_0000009"],
        "first_name": ["", "Typed", "", "Walk-in", ""],
        "last_name": ["", "", "", "Person", ""],
        "dob": [None, "", "", "1990-01-01", ""],
    })
    out, rejects = enrich_frame(frame, make_rupa_lookup(engine))

    one = extracted.patient("pat_0000001")["attributes"]
    two = extracted.patient("pat_0000002")["attributes"]
    assert out.loc[0, ["first_name", "last_name", "email", "dob"]].tolist() == [
        one["first_name"], one["last_name"], one["email"], one["birthday"]]
    assert out.loc[1, "first_name"] == "Typed" and out.loc[1, "last_name"] == two["last_name"]
    assert out.loc[3, "first_name"] == "Walk-in" and pd.isna(out.loc[3, "email"])
    assert set(rejects) == {2, 4}
    assert "pat_missing" in rejects[2] and "labsync extract patients" in rejects[2]
    assert frame.loc[0, "first_name"] == ""  # the input frame is not modified


def test_frames_without_the_column_pass_through(engine):
    frame = pd.DataFrame({"first_name": ["x"]})
    out, rejects = enrich_frame(frame, make_rupa_lookup(engine))
    assert out is frame and rejects == {}
