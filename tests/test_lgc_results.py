"""LetsGetChecked results into the warehouse (SQLite and PostgreSQL), fetched from the sandbox
over real HTTP: stored once however often `labsync results` runs, 404 until released, HL7 added
later, tolerant parsing, and no result value or name (or patient data) in any log line."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from etl import logs
from etl.orders.lifecycle import Observation, apply_observations, track
from etl.orders.results import candidates, fetch_results, parse_results, store_result
from etl.states import StatusSource
from etl.warehouse.tables import lgc_result_values, lgc_results
from tests.lifecycle_support import items, lgc, place_orders, quick, receiver, run, send_webhooks_to

__all__ = ["run"]  # the in-process CLI fixture


def stored(engine) -> dict[str, dict]:
    with engine.connect() as conn:
        return {r.barcode: dict(r._mapping) for r in conn.execute(sa.select(lgc_results))}


def values(engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(
            sa.select(lgc_result_values).order_by(lgc_result_values.c.barcode, lgc_result_values.c.position))]


def test_results_are_stored_once_however_often_results_runs(engine, settings, sandbox):
    s = quick(settings)
    a, b = place_orders(engine, s, 2)
    sb = lgc(sandbox).lifecycle
    sb.advance(a, to="ResultsAvailable")
    sb.advance(b, to="KitArrivedAtLab")
    track(engine, s)
    first = fetch_results(engine, s)
    assert (first.candidates, first.stored, first.values, first.not_released) == (2, 2, 3, 0)

    requests = sum(lgc(sandbox).results_count.values())
    assert requests == 4  # JSON + HL7 per item
    for _ in range(2):
        again = fetch_results(engine, s)
        assert (again.candidates, again.stored) == (0, 0)
    with ThreadPoolExecutor(2) as pool:  # two runs at once (the DAG and a CLI run)
        assert [f.result().stored for f in [pool.submit(fetch_results, engine, s) for _ in range(2)]] == [0, 0]
    assert sum(lgc(sandbox).results_count.values()) == requests  # nothing asked again

    rows = stored(engine)
    assert len(rows) == 2
    for item in sb.orders[a].items:
        row = rows[item.barcode]
        raw_json, raw_hl7 = bytes(row["json_body"]), bytes(row["hl7_body"])
        assert raw_json == sb.results_json(item)  # the bytes as sent
        assert row["json_sha256"] == hashlib.sha256(raw_json).hexdigest()
        assert row["hl7_sha256"] == hashlib.sha256(raw_hl7).hexdigest()
        assert raw_hl7.startswith(b"MSH|^~\\&|") and b"|ORU^R01|" in raw_hl7 and b"|2.3" in raw_hl7
        assert raw_hl7.count(b"\rOBX|") == len(sb.panel(item)) + 1
        assert (row["item_id"], row["client_order_id"], row["alpha_code"]) == (item.id, a, item.alpha_code)
        parsed = [v for v in values(engine) if v["barcode"] == item.barcode]
        assert row["value_count"] == len(parsed) == len(sb.panel(item))
        for v, truth in zip(parsed, sb.panel(item), strict=True):
            assert v["biomarker_name"] == truth["biomarkerName"] and v["loinc"] == truth["coding"][0]["code"]
            assert v["descriptor"] == truth["descriptor"] and v["kind"] == truth["kind"]
            if truth["kind"] == "Quantitative":
                assert v["numeric_value"] == pytest.approx(truth["quantitativeValue"])
                assert (v["unit"], float(v["lower_bound"]), float(v["upper_bound"])) == (
                    truth["unitOfMeasure"], truth["lowerBound"], truth["upperBound"])
            else:
                assert (v["value"], v["numeric_value"]) == (truth["qualitativeValue"], None)

    sb.advance(b)  # b's results are released now
    track(engine, s)
    later = fetch_results(engine, s)
    assert (later.stored, later.values) == (2, 3) and len(stored(engine)) == 4


def test_results_not_released_yet_are_asked_again_by_the_next_run(engine, settings, sandbox):
    s = quick(settings)
    (coid,) = place_orders(engine, s, 1)
    sb = lgc(sandbox).lifecycle
    sb.advance(coid, to="KitRegistered")
    track(engine, s)  # barcodes known
    # a webhook says ResultsAvailable before LetsGetChecked releases them
    future = datetime(2100, 1, 1, tzinfo=UTC)
    apply_observations(engine, [Observation(item_id, coid, "ResultsAvailable", future, StatusSource.WEBHOOK)
                                for item_id in items(engine)])
    early = fetch_results(engine, s)
    assert (early.candidates, early.not_released, early.stored, early.exit_code) == (2, 2, 0, 0)
    assert stored(engine) == {}
    sb.advance(coid, to="ResultsAvailable")
    assert fetch_results(engine, s).stored == 2


def test_an_hl7_message_missing_at_first_is_added_by_a_later_run(engine, settings, sandbox):
    s = quick(settings)
    (coid,) = place_orders(engine, s, 1)
    sb = lgc(sandbox).lifecycle
    sb.advance(coid, to="ResultsAvailable")
    track(engine, s)
    due = candidates(engine)
    for c in due:  # stored by a run that got the JSON while the HL7 was not there yet
        item = sb.item(coid, c.item_id)
        assert store_result(engine, c, sb.results_json(item), None)[0]
    assert {r["hl7_body"] for r in stored(engine).values()} == {None}
    assert {c.has_json for c in candidates(engine)} == {True}
    done = fetch_results(engine, s)
    assert (done.stored, done.hl7_added) == (0, 2)
    assert all(bytes(r["hl7_body"]).startswith(b"MSH|") for r in stored(engine).values())
    assert candidates(engine) == [] and len(values(engine)) == 3  # values were not stored twice


def test_parsing_is_tolerant_and_an_unreadable_document_is_kept_raw(engine):
    doc = {"TestResults": [
        {"biomarkerName": "Ferritin", "kind": "Quantitative", "values": [{"value": 41.5, "unit": "ng/mL"}],
         "referenceRange": {"low": 15, "high": 150}, "loinc": "2276-4"},
        {"name": "HPV", "kind": "Genetic", "values": ["Negative", "Negative"], "coding": {"system": "LOINC", "code": "21440-3"}},
        "not an object",
    ]}
    first, second = parse_results(json.dumps(doc).encode())
    assert (first["biomarker_name"], first["value"], first["numeric_value"], first["unit"]) == ("Ferritin", "41.5", 41.5, "ng/mL")
    assert (first["lower_bound"], first["upper_bound"], first["loinc"]) == ("15", "150", "2276-4")
    assert (second["biomarker_name"], second["value"], second["loinc"], second["position"]) == ("HPV", "Negative; Negative", "21440-3", 1)
    with pytest.raises(ValueError):
        parse_results(b'{"status": "ResultsAvailable"}')

    from etl.orders.results import _Candidate

    c = _Candidate("item-x", "ORD-X", "LGC-0000-0000-0009", "ABCDEF", False)
    assert store_result(engine, c, b"<html>oops</html>", None) == (True, 0, False)
    assert store_result(engine, c, b"<html>oops</html>", None) == (False, 0, False)
    assert bytes(stored(engine)["LGC-0000-0000-0009"]["json_body"]) == b"<html>oops</html>"


PATIENT = {"first_name": "Zelphinia", "last_name": "Quorrington", "email": "zq@phi-test.example",
           "dob": "1977-03-29", "phone_number": "5551234987"}


def test_no_result_value_or_name_in_any_log_line(run, engine, settings, sandbox, caplog, monkeypatch):
    def verbose(*_level) -> None:  # everything at DEBUG, httpx and httpcore included
        for name in ("etl", "httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.DEBUG)

    monkeypatch.setattr(logs, "configure", verbose)
    caplog.set_level(logging.DEBUG)
    s = quick(settings)
    coids = place_orders(engine, s, 3, **PATIENT)
    sb = lgc(sandbox).lifecycle
    outputs = []
    with receiver(engine) as rx:
        send_webhooks_to(sandbox, rx)
        sb.advance(coids[0], to="ResultsAvailable")
        sb.advance(coids[1], to="KitArrivedAtLab")
        assert sb.wait_idle()
        for args in (["lifecycle"], ["track"], ["results"], ["cancel", coids[1]], ["status", coids[0]],
                     ["status", "--batch", "x"], ["track", coids[0], "--json"], ["results", "--json"]):
            outputs.append(run(*args))
    assert [code for code, _, _ in outputs] == [0, 0, 0, 1, 0, 1, 0, 0]
    assert len(stored(engine)) == 2

    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert coids[0] in logged and "results stored" in logged  # the capture saw the work
    printed = "\n".join(out + err for _, out, err in outputs)
    secrets = set(PATIENT.values())
    for item in sb.orders[coids[0]].items:
        for r in sb.panel(item):
            secrets |= {r["biomarkerName"], r["headline"], r["description"]}
            secrets.add(str(r.get("quantitativeValue", r.get("qualitativeValue"))))
    secrets |= {"Not Detected", "Detected"}
    for where, text in (("logs", logged), ("output", printed)):
        for value in secrets:
            # as a token of its own: a value such as 5.6 must not match inside a timestamp
            # (07:18:55.695) that the output carries since every --json has times
            leaked = re.search(rf"(?<![\w.:]){re.escape(value)}(?![\w])", text)
            assert leaked is None, f"{value!r} appears in the {where}"
        assert "MSH|" not in text and "testResults" not in text
