"""`labsync export fhir` (issue 26): lab observations of both vendors as FHIR R4, every resource
parsed and validated with the `fhir.resources` package (its R4B models: the resources used here
are the same in R4 4.0.1, which the export declares), every reference resolving within the
export; incremental by a stored watermark; a correction re-exports the same Observation id as
corrected; transaction Bundles POSTed to a FHIR endpoint on loopback. SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from etl.asgi import BackgroundServer
from etl.checkout import events
from etl.orders.lifecycle import track
from etl.orders.results import fetch_results
from etl.results import observations
from etl.results.fhir import export_fhir
from tests.lifecycle_support import lgc, place_orders, quick, run
from tests.test_observations import CRITICAL_MSG, _store_rupa_file, fixture, rows
from tests.test_observations import both_vendors as observations_both

__all__ = ["run"]

fhir_r4b = pytest.importorskip("fhir.resources.R4B")

OBS_STATUS = {"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown"}
REPORT_STATUS = OBS_STATUS | {"partial"}


def model(kind: str):
    import importlib

    return getattr(importlib.import_module(f"fhir.resources.R4B.{kind.lower()}"), kind)


def read_export(out: Path) -> dict[str, list[dict]]:
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fhirVersion"] == "4.0.1"
    got: dict[str, list[dict]] = {}
    for entry in manifest["output"]:
        lines = (out / entry["url"]).read_text().splitlines()
        assert len(lines) == entry["count"]
        got[entry["type"]] = [json.loads(line) for line in lines]
    return got


def validate(resources: dict[str, list[dict]]) -> None:
    """Each resource through its fhir.resources model; statuses from their value sets; ids unique;
    every reference (Type/id) names a resource of the export."""
    ids = set()
    for kind, items in resources.items():
        for r in items:
            assert r["resourceType"] == kind
            parsed = model(kind).model_validate(r)
            assert parsed.id == r["id"] and (kind, r["id"]) not in ids
            ids.add((kind, r["id"]))
            if kind == "Observation":
                assert r["status"] in OBS_STATUS
            if kind == "DiagnosticReport":
                assert r["status"] in REPORT_STATUS
    refs = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("reference"), str):
                refs.append(node["reference"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(resources)
    assert refs
    for ref in refs:
        kind, _, rid = ref.partition("/")
        assert (kind, rid) in ids, ref


def both_vendors(engine, settings, sandbox, rupa, receiver, tmp_path) -> tuple[str, str]:
    return observations_both(engine, settings, sandbox, rupa, receiver, tmp_path, lab_tests="labts_0000003")


def test_export_fhir_ndjson_of_both_vendors_validates_and_resolves(engine, settings, sandbox, rupa, receiver,
                                                                   tmp_path, run):
    coid, oid = both_vendors(engine, settings, sandbox, rupa, receiver, tmp_path)
    out = tmp_path / "fhir"
    code, text, _ = run("export", "fhir", "--out", str(out))
    assert code == 0 and "Observation" in text
    got = read_export(out)
    validate(got)
    current = [r for r in rows(engine) if r["current"]]
    assert len(got["Observation"]) == len(current)
    items = {r["item_id"] for r in current}
    assert len(got["ServiceRequest"]) == len(got["DiagnosticReport"]) == len(items)
    assert len(got["DocumentReference"]) == 1  # Rupa's PDF
    assert "Patient" not in got  # by identifier only unless asked
    by_id = {o["id"]: o for o in got["Observation"]}
    for report in got["DiagnosticReport"]:
        assert report["result"] and all(ref["reference"].split("/")[1] in by_id for ref in report["result"])
    lgc_obs = [o for o in got["Observation"] if o["identifier"][0]["system"] == "urn:labsync:lgc:observation"]
    for o in lgc_obs:
        assert o["code"]["coding"][0]["system"] == "http://loinc.org"
        assert o["subject"]["identifier"]["value"] == lgc(sandbox).lifecycle.orders[coid].participant_id
    rupa_obs = [o for o in got["Observation"] if o["identifier"][0]["system"] == "urn:labsync:rupa:observation"]
    assert [(o["valueQuantity"]["value"], o["valueQuantity"]["unit"], o["status"]) for o in rupa_obs] == [
        (31.0, "ng/mL", "final")]
    assert rupa_obs[0]["referenceRange"][0]["low"]["value"] == 30.0
    assert rupa_obs[0]["interpretation"][0]["coding"][0]["code"] == "N"

    code, text, _ = run("export", "fhir", "--out", str(out))  # incremental: nothing new, files left alone
    assert code == 0 and "nothing new" in text
    assert read_export(out) == got

    rupa.checkout.add_results(oid)  # a correction
    rupa.checkout.sender.flush()
    events.apply_events(engine, settings)
    run("export", "fhir", "--out", str(out))
    again = read_export(out)
    validate(again)
    (corrected,) = again["Observation"]
    assert corrected["id"] == rupa_obs[0]["id"] and corrected["status"] == "corrected"
    assert corrected["valueQuantity"]["value"] == 32.0
    assert again["DiagnosticReport"][0]["status"] == "corrected"


def test_outside_messages_critical_flags_and_patients_on_request(engine, tmp_path):
    for name in ("nist_elr_2.5.1_case1_lead.hl7", "hl7_elr_2.5.1_two_orders.hl7",
                 "nhapi_olis_2.3_lipid_nte.hl7", "nhapi_2.3.1_cbc_dollar_subcomponent.hl7",
                 "hapi_2.4_blood_gas_escapes.hl7"):
        f = _store_rupa_file(engine, fixture(name), test_id=f"ordts_{name[:12]}", order_id=f"ord_{name[:8]}")
        assert observations.record_rupa(engine, f) > 0
    f = _store_rupa_file(engine, CRITICAL_MSG, test_id="ordts_crit", order_id="ord_crit")
    observations.record_rupa(engine, f)
    summary = export_fhir(engine, out_dir=tmp_path / "x", with_patients=True)
    got = read_export(tmp_path / "x")
    validate(got)
    assert summary.resources["Observation"] == len(got["Observation"]) == len(rows(engine))
    assert {p["identifier"][0]["value"] for p in got["Patient"]} >= {"9817566735", "36363636", "PAT-9"}
    assert all(set(p) == {"resourceType", "id", "identifier"} for p in got["Patient"])  # no name, no birth date
    critical = [o for o in got["Observation"] if o.get("interpretation", [{}])[0].get("coding", [{}])[0].get("code") == "LL"]
    assert len(critical) == 1 and critical[0]["valueQuantity"] == {"value": 38.0, "unit": "mg/dL"}
    texts = [o["valueString"] for o in got["Observation"] if "valueString" in o]
    assert any("^o C" in t for t in texts)  # \S\ unescaped
    assert export_fhir(engine, out_dir=tmp_path / "x").resources["Observation"] == 0
    assert export_fhir(engine, out_dir=tmp_path / "y", since=summary_since(engine)).resources["Observation"] == len(rows(engine))


def summary_since(engine):
    return min(r["recorded_at"] for r in rows(engine))


def test_transaction_bundles_to_a_fhir_endpoint(engine, tmp_path):
    """POSTs to a FHIR endpoint on loopback that accepts a transaction Bundle only if it validates."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    bundle_model = model("Bundle")
    received: list[dict] = []

    async def base(request):
        if "fhir+json" not in request.headers.get("content-type", ""):
            return JSONResponse({"resourceType": "OperationOutcome"}, status_code=415)
        doc = await request.json()
        bundle_model.model_validate(doc)
        assert doc["type"] == "transaction"
        for entry in doc["entry"]:
            model(entry["resource"]["resourceType"]).model_validate(entry["resource"])
        received.append(doc)
        return JSONResponse({"resourceType": "Bundle", "type": "transaction-response", "entry": []})

    server = BackgroundServer(Starlette(routes=[Route("/fhir/", base, methods=["POST"])])).start()
    try:
        f = _store_rupa_file(engine, fixture("nist_elr_2.5.1_case1_lead.hl7"))
        observations.record_rupa(engine, f)
        summary = export_fhir(engine, url=f"{server.url}/fhir")
        assert summary.bundles == 1 and len(received) == 1
        kinds = [e["resource"]["resourceType"] for e in received[0]["entry"]]
        assert kinds == ["ServiceRequest", "DiagnosticReport", "Observation"]
        assert all(e["request"]["method"] == "PUT" for e in received[0]["entry"])
        assert export_fhir(engine, url=f"{server.url}/fhir").bundles == 0  # the watermark of this target
    finally:
        server.stop()


def test_an_hl7_filling_in_exported_rows_is_exported_again(engine, settings, sandbox, tmp_path):
    from etl.orders.results import candidates, store_result

    s = quick(settings)
    (coid,) = place_orders(engine, s, 1)
    sb = lgc(sandbox).lifecycle
    sb.advance(coid, to="ResultsAvailable")
    track(engine, s)
    for c in candidates(engine):  # the JSON first; the HL7 not released yet
        store_result(engine, c, sb.results_json(sb.item(coid, c.item_id)), None)
        observations.record_lgc(engine, c.barcode)
    first = export_fhir(engine, out_dir=tmp_path / "a")
    got = read_export(tmp_path / "a")
    validate(got)
    assert all("effectiveDateTime" not in o for o in got["Observation"])  # the JSON has no times
    assert fetch_results(engine, s).hl7_added == 2
    second = export_fhir(engine, out_dir=tmp_path / "b")
    again = read_export(tmp_path / "b")
    validate(again)
    assert second.resources["Observation"] == first.resources["Observation"]
    assert {o["id"] for o in again["Observation"]} == {o["id"] for o in got["Observation"]}
    assert all("effectiveDateTime" in o for o in again["Observation"])  # OBR-7 from the HL7
    assert export_fhir(engine, out_dir=tmp_path / "c").resources["Observation"] == 0


@pytest.mark.parametrize("url", ["http://fhir.example.com/r4", "ftp://fhir.example.com/r4", "https://x.example/r4?q=1"])
def test_a_fhir_url_in_clear_or_malformed_is_refused_before_anything_is_sent(engine, url):
    """The bundles carry PHI: plain http only to loopback, as for the vendors' URLs."""
    from etl.errors import ConfigError

    with pytest.raises(ConfigError, match="--url"):
        export_fhir(engine, url=url)
