"""One table of lab observations across both vendors (issue 26): HL7 v2 parsed by python-hl7 from
messages nobody here wrote (tests/fixtures/hl7, sources in its README) and from the sandboxes;
LetsGetChecked's JSON and HL7 merged into one row per observation; Rupa's HL7 per file; a
correction supersedes and keeps history; repeats add nothing; flagged results listed and reported
as an asset event's extras, never a value in a log. SQLite and PostgreSQL."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import sqlalchemy as sa

from etl.airflow.tasks import report_flagged
from etl.checkout import events
from etl.orders.lifecycle import track
from etl.orders.results import fetch_results
from etl.results import observations
from etl.results.hl7 import Hl7Error, hl7_time, parse_oru
from etl.warehouse.tables import lab_observations, lgc_results, rupa_results
from tests.lifecycle_support import lgc, place_orders, quick, run
from tests.test_rupa_events import one_cart

__all__ = ["run"]

FIXTURES = Path(__file__).parent / "fixtures" / "hl7"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def rows(engine, **where) -> list[dict]:
    t = lab_observations
    q = sa.select(t).order_by(t.c.id)
    for k, v in where.items():
        q = q.where(t.c[k] == v)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


# ---- the parser, on real messages -------------------------------------------------------------
def test_nist_2_5_1_lead_result_and_its_correction():
    first = parse_oru(fixture("nist_elr_2.5.1_case1_lead.hl7"))
    assert (first.version, first.message_type, first.patient_id) == ("2.5.1", "ORU^R01", "9817566735")
    ((group, o),) = first.observations
    assert (o.code, o.code_system, o.name) == ("10368-9", "http://loinc.org", "Lead BldC-mCnc")
    assert (o.value, o.value_type, o.numeric_value, o.unit) == ("50", "NM", 50.0, "ug/dL")
    assert o.reference_range == "<9 mcg/dL:  Acceptable background lead exposure"
    assert (o.abnormal_flags, o.interpretation, o.status, o.sub_id) == ("H", "abnormal", "F", "1")
    assert o.observed_at.isoformat() == "2008-08-15T17:30:00+00:00"  # 200808151030-0700
    assert group.filler_order == "9700123" and group.test_code == "10368-9"
    ((_, c),) = parse_oru(fixture("nist_elr_2.5.1_case3_lead_corrected.hl7")).observations
    assert (c.code, c.value, c.status, c.unit) == ("10368-9", "25", "C", "ug/dl")


def test_several_obr_groups_repeats_and_coded_values():
    report = parse_oru(fixture("hl7_elr_2.5.1_two_orders.hl7"))
    assert [g.test_code for g in report.groups] == ["625-4", "10368-9"]
    assert report.patient_id == "36363636"  # PID-3's first repeat (a second one follows a ~)
    (culture,), (lead,) = (g.observations for g in report.groups)
    assert (culture.value_type, culture.value, culture.status) == ("CWE", "Campylobacter jejuni", "P")
    assert (lead.value, lead.unit, lead.reference_range, lead.interpretation) == ("50", "ug/dL", "<10 ug/dL", "abnormal")


def test_hl7_2_3_escapes_and_notes():
    report = parse_oru(fixture("nhapi_olis_2.3_lipid_nte.hl7"))
    assert report.version == "2.3"
    (group,) = report.groups
    (note,) = group.notes  # the NTE after the OBR: \F\ is a literal |, \.br\ a line break
    assert "|  Risk   |" in note and "\\F\\" not in note and "\n" in note
    chol, comment = group.observations
    assert (chol.code, chol.code_system, chol.value, chol.numeric_value, chol.unit) == (
        "Z049107", "L", "2.30", 2.3, "mmol/L")
    assert (comment.value_type, comment.value, chol.interpretation) == ("FT", "Lab STP", "unknown")


def test_component_separator_escape_in_a_formatted_text_value():
    ((_, o),) = parse_oru(fixture("hapi_2.4_blood_gas_escapes.hl7")).observations
    assert "Calculated (37 ^o C)" in o.value  # \S\ is a literal ^
    assert "\\S\\" not in o.value and "\\.br\\" not in o.value
    assert (o.abnormal_flags, o.interpretation) == ("A", "abnormal")


def test_an_unusual_encoding_character_set():
    report = parse_oru(fixture("nhapi_2.3.1_cbc_dollar_subcomponent.hl7"))  # MSH|^~\$ : $ separates sub-components
    assert report.version == "2.3.1"
    obs = report.observations
    assert len(obs) == 20
    wbc = obs[0][1]
    assert (wbc.code, wbc.value, wbc.unit, wbc.reference_range, wbc.interpretation) == (
        "WBC", "20.0", "k/uL", "4.5-10.0", "abnormal")
    plt = next(o for _, o in obs if o.code == "PLTC" and o.value_type == "NM")
    assert plt.abnormal_flags == "PL"  # OBX-8 "PL^Y": the flag's first component; not a 0078 code
    assert plt.interpretation == "unknown"
    assert {o.status for _, o in obs} == {"Z"}


@pytest.mark.parametrize(("flags", "expected"), [
    ("HH", "critical"), ("LL", "critical"), ("AA", "critical"), ("H", "abnormal"), ("N", "normal"),
    ("", "unknown"), ("H~POS", "abnormal"), ("N~HH", "critical"),
])
def test_interpretation_is_normalised_from_obx_8(flags, expected):
    msg = ("MSH|^~\\&|LAB|X|Y|Z|20240101120000||ORU^R01|1|P|2.5.1\rPID|1||P1\rOBR|1||F1|GLU^Glucose^L\r"
           f"OBX|1|NM|2345-7^Glucose^LN||40|mg/dL|70-99|{flags}|||F\r")
    ((_, o),) = parse_oru(msg.encode()).observations
    assert o.interpretation == expected


def test_not_hl7_is_refused_without_quoting_it():
    with pytest.raises(Hl7Error) as info:
        parse_oru(b"Dear patient, your glucose is 40")
    assert "glucose" not in str(info.value)
    assert hl7_time("2008081510") is not None and hl7_time("not a time") is None


# ---- LetsGetChecked: JSON and HL7 of one result, one row per observation ------------------------
def test_lgc_json_and_hl7_are_two_views_of_the_same_observations(engine, settings, sandbox):
    s = quick(settings)
    (coid,) = place_orders(engine, s, 1)
    sb = lgc(sandbox).lifecycle
    sb.advance(coid, to="ResultsAvailable")
    track(engine, s)
    summary = fetch_results(engine, s)
    assert summary.stored == 2
    got = rows(engine, vendor="lgc")
    expected = [(item, r) for item in sb.orders[coid].items for r in sb.panel(item)]
    assert len(got) == len(expected)  # one row per biomarker: the AOE Client Order ID OBX is not one
    for item, truth in expected:
        (row,) = [r for r in got if r["item_id"] == item.id and r["code"] == truth["coding"][0]["code"]]
        assert row["code_system"] == "http://loinc.org" and row["name"] == truth["biomarkerName"]
        assert (row["order_id"], row["ordered_test"], row["result_key"]) == (coid, item.code, f"lgc:{item.barcode}")
        assert row["patient_id"] == sb.orders[coid].participant_id
        assert {(s["view"], s["key"]) for s in row["sources"]} == {("json", item.barcode), ("hl7", item.barcode)}
        assert row["current"] and row["status"] == "F" and row["observed_at"] is not None
        if truth["kind"] == "Quantitative":
            assert row["numeric_value"] == pytest.approx(truth["quantitativeValue"])
            assert row["unit"] == truth["unitOfMeasure"]
            assert row["reference_range"] == f"{truth['lowerBound']}-{truth['upperBound']}"
            assert row["interpretation"] == ("normal" if truth["descriptor"] == "Normal" else "abnormal")
        else:
            assert row["value"] == truth["qualitativeValue"]
    before = rows(engine)
    assert fetch_results(engine, s).stored == 0
    assert observations.record_all(engine) == 0  # every document again: nothing new
    assert rows(engine) == before


def test_lgc_hl7_arriving_after_the_json_enriches_the_same_rows(engine, settings, sandbox):
    from etl.orders.results import candidates, store_result

    s = quick(settings)
    (coid,) = place_orders(engine, s, 1)
    sb = lgc(sandbox).lifecycle
    sb.advance(coid, to="ResultsAvailable")
    track(engine, s)
    for c in candidates(engine):  # a run that got the JSON while the HL7 was not released
        assert store_result(engine, c, sb.results_json(sb.item(coid, c.item_id)), None)[0]
        observations.record_lgc(engine, c.barcode)
    json_only = rows(engine)
    assert json_only and all([x["view"] for x in r["sources"]] == ["json"] for r in json_only)
    assert fetch_results(engine, s).hl7_added == 2
    both = rows(engine)
    assert [r["id"] for r in both] == [r["id"] for r in json_only]  # the same rows, not new versions
    assert all(r["current"] and {x["view"] for x in r["sources"]} == {"json", "hl7"} for r in both)


# ---- Rupa: the HL7 of each result file; a correction supersedes -----------------------------------
def test_rupa_hl7_observations_and_a_correction_that_supersedes(engine, settings, rupa, receiver, tmp_path):
    receiver()
    cart = one_cart(engine, settings, tmp_path, lab_tests="labts_0000003")
    ck = rupa.checkout
    oid = ck.submit(cart["order_intent_id"])
    ck.add_results(oid)
    ck.sender.flush()
    events.apply_events(engine, settings)
    (first,) = rows(engine, vendor="rupa")
    tid = ck.orders[oid]["relationships"]["ordered_tests"]["data"][0]["id"]
    with engine.connect() as conn:
        hl7_file = conn.execute(sa.select(rupa_results.c.id, rupa_results.c.content)
                                .where(rupa_results.c.kind == "hl7")).one()
    ((_, truth),) = parse_oru(bytes(hl7_file.content)).observations  # the sandbox's own document
    assert (first["order_id"], first["item_id"], first["ordered_test"]) == (oid, tid, "labts_0000003")
    assert first["patient_id"] == "pat_0000004" and first["result_key"] == f"rupa_results:{hl7_file.id}"
    assert (first["code"], first["code_system"], first["value"], first["unit"]) == (
        truth.code, truth.code_system, truth.value, truth.unit) == ("25OHD", "L", "31", "ng/mL")
    assert (first["interpretation"], first["status"], first["current"]) == ("normal", "F", True)

    ck.renew_result_links(oid)  # Rupa repeats the event: the same file, nothing new
    ck.sender.flush()
    events.apply_events(engine, settings)
    assert len(rows(engine, vendor="rupa")) == 1

    ck.add_results(oid)  # a correction: OBX-11 C, a new value
    ck.sender.flush()
    events.apply_events(engine, settings)
    old, new = rows(engine, vendor="rupa")
    assert (new["value"], new["status"], new["current"]) == ("32", "C", True)
    assert (old["value"], old["current"], old["superseded_by"]) == ("31", False, new["id"])
    assert old["superseded_at"] is not None
    assert observations.record_all(engine) == 0 and len(rows(engine)) == 2


def both_vendors(engine, settings, sandbox, rupa, receiver, tmp_path, *,
                 lab_tests: str = "labts_0000001;labts_0000002") -> tuple[str, str]:
    """One LetsGetChecked order to ResultsAvailable, its results fetched; one Rupa order checked
    out with results, its events applied. Returns (clientOrderId, Rupa order id)."""
    s = quick(settings)
    (coid,) = place_orders(engine, s, 1)
    lgc(sandbox).lifecycle.advance(coid, to="ResultsAvailable")
    track(engine, s)
    fetch_results(engine, s)
    receiver()
    cart = one_cart(engine, settings, tmp_path, lab_tests=lab_tests)
    oid = rupa.checkout.submit(cart["order_intent_id"])
    rupa.checkout.add_results(oid)
    rupa.checkout.sender.flush()
    events.apply_events(engine, settings)
    return coid, oid


def test_both_vendors_in_one_table(engine, settings, sandbox, rupa, receiver, tmp_path):
    coid, oid = both_vendors(engine, settings, sandbox, rupa, receiver, tmp_path)
    counts = observations.counts(engine)
    with engine.connect() as conn:
        panels = sum(len(lgc(sandbox).lifecycle.panel(i)) for i in lgc(sandbox).lifecycle.orders[coid].items)
        assert conn.execute(sa.select(sa.func.count()).select_from(lgc_results)).scalar() == 2
    assert counts == {"lgc": panels, "rupa": 2}
    checked = observations.verify(engine)  # what `make demo` prints: every value as its document says
    assert checked == {"lgc": {"documents": 2, "observations": panels, "matched": panels},
                       "rupa": {"documents": 2, "observations": 2, "matched": 2}}


# ---- documents from outside: storing, corrections, repeats -------------------------------------
def _store_rupa_file(engine, content: bytes, *, test_id="ordts_x1", order_id="ord_x") -> int:
    """A Rupa HL7 file as etl.checkout.events stores it (the test stands in for the download)."""
    import hashlib
    from datetime import UTC, datetime

    with engine.begin() as conn:
        return conn.execute(sa.insert(rupa_results).values(
            ordered_test_id=test_id, order_id=order_id, kind="hl7", sha256=hashlib.sha256(content).hexdigest(),
            size=len(content), content_type="application/hl7-v2", content=content, stored_at=datetime.now(UTC),
        ).returning(rupa_results.c.id)).scalar_one()


def test_a_real_correction_message_supersedes_and_a_redelivery_adds_nothing(engine):
    first = _store_rupa_file(engine, fixture("nist_elr_2.5.1_case1_lead.hl7"))
    assert observations.record_rupa(engine, first) == 1
    assert observations.record_rupa(engine, first) == 0
    second = _store_rupa_file(engine, fixture("nist_elr_2.5.1_case3_lead_corrected.hl7"))
    assert observations.record_rupa(engine, second) == 1
    old, new = rows(engine)
    assert (old["value"], old["status"], old["current"], old["superseded_by"]) == ("50", "F", False, new["id"])
    assert (new["value"], new["status"], new["current"]) == ("25", "C", True)
    assert new["obs_key"] == old["obs_key"] and new["patient_id"] == "9817566735"


def test_a_document_saying_the_same_again_only_names_its_source(engine):
    doc = fixture("nhapi_2.3.1_cbc_dollar_subcomponent.hl7")
    a = _store_rupa_file(engine, doc)
    b = _store_rupa_file(engine, doc.replace(b"|200511291403|", b"|200511291404|"))  # sent again, new header
    assert observations.record_rupa(engine, a) == 20
    assert observations.record_rupa(engine, b) == 0
    got = rows(engine)
    assert len(got) == 20 and all(r["current"] for r in got)
    assert all({s["key"] for s in r["sources"]} == {str(a), str(b)} for r in got)


def test_a_message_with_two_obr_groups_keeps_them_apart(engine):
    f = _store_rupa_file(engine, fixture("hl7_elr_2.5.1_two_orders.hl7"))
    assert observations.record_rupa(engine, f) == 2
    assert sorted(r["obs_key"].split("/")[0] for r in rows(engine)) == ["10368-9", "625-4"]


def test_an_unreadable_document_is_skipped_without_quoting_it(engine, caplog):
    f = _store_rupa_file(engine, b"MSH|this is not | a real message and has a glucose of 40")
    caplog.set_level(logging.DEBUG)
    assert observations.record_rupa(engine, f) == 0
    assert "glucose" not in caplog.text
    g = _store_rupa_file(engine, b"patient Jane Doe glucose 40", test_id="ordts_x2")
    assert observations.record_rupa(engine, g) == 0
    assert "Jane" not in caplog.text and "glucose" not in caplog.text


# ---- flags -------------------------------------------------------------------------------------
CRITICAL_MSG = (b"MSH|^~\\&|LAB|X|Y|Z|20240101120000||ORU^R01|77|P|2.5.1\rPID|1||PAT-9\r"
                b"OBR|1||F1|GLU^Glucose^L|||20240101110000\r"
                b"OBX|1|NM|2345-7^Glucose^LN||38|mg/dL|70-99|LL|||F\r"
                b"OBX|2|NM|2823-3^Potassium^LN||5.9|mmol/L|3.5-5.1|H|||F\r")


def test_flagged_lists_critical_and_reports_each_once_as_an_asset_event(engine, run, settings, caplog, monkeypatch):
    f = _store_rupa_file(engine, CRITICAL_MSG, test_id="ordts_c1", order_id="ord_c")
    assert observations.record_rupa(engine, f) == 2
    assert [r["code"] for r in observations.flagged(engine)] == ["2345-7"]
    assert {r["code"] for r in observations.flagged(engine, observations.levels_for("abnormal"))} == {"2823-3", "2345-7"}
    assert all("value" not in r and "numeric_value" not in r for r in observations.flagged(engine))

    code, out, err = run("results", "--flagged")
    assert code == 0 and "ord_c" in out and "2345-7" in out and "critical" in out
    assert "38" not in out.replace("2345-7", "")  # the value is never printed
    code, out, _ = run("results", "--flagged", "--level", "abnormal", "--json")
    assert code == 0 and {r["code"] for r in json.loads(out)["flagged"]} == {"2345-7", "2823-3"}
    assert run("results", "--flagged", "--level", "worst")[0] == 2

    from airflow.sdk import Asset
    from airflow.sdk.execution_time.context import OutletEventAccessors

    outlet_events = OutletEventAccessors()
    caplog.set_level(logging.DEBUG)
    assert report_flagged(engine, outlet_events) == 1
    extra = outlet_events[Asset(name="lgc_results", uri="labsync://warehouse/lgc_results")].extra
    (event,) = extra["flagged_observations"]
    assert event["order_id"] == "ord_c" and event["code"] == "2345-7" and event["interpretation"] == "critical"
    assert "38" not in json.dumps(event) and "PAT-9" not in json.dumps(event)
    assert "38" not in caplog.text and "PAT-9" not in caplog.text
    assert report_flagged(engine, OutletEventAccessors()) == 0  # reported once
    monkeypatch.setenv("LABSYNC_RESULTS_FLAG_LEVEL", "abnormal")
    assert report_flagged(engine, OutletEventAccessors()) == 1  # the abnormal one, now asked for



def test_the_retention_purge_drops_observations_with_their_documents(engine):
    from datetime import UTC, datetime, timedelta

    from etl.retention import purge_result_documents

    f = _store_rupa_file(engine, fixture("nist_elr_2.5.1_case1_lead.hl7"))
    observations.record_rupa(engine, f)
    assert len(rows(engine)) == 1
    with engine.begin() as conn:
        assert purge_result_documents(conn, datetime.now(UTC) + timedelta(days=1)) == [f"rupa:{f}"]
    assert rows(engine) == []
    assert observations.record_all(engine) == 0 and rows(engine) == []  # nothing left to read them from


def test_reread_records_documents_stored_before_the_table_existed(engine, run):
    f = _store_rupa_file(engine, fixture("hl7_elr_2.5.1_two_orders.hl7"))  # stored, never read
    assert rows(engine) == []
    code, out, _ = run("results", "--reread")
    assert code == 0 and "2 observations added" in out and len(rows(engine)) == 2
    assert run("results", "--reread")[1].startswith("results: 0 observations added")
    assert {r["result_key"] for r in rows(engine)} == {f"rupa_results:{f}"}
