"""FHIR R4 (4.0.1) export of `lab_observations`: `labsync export fhir`.

    export_fhir(engine, out_dir=DIR | url=FHIR_BASE, since=None, with_patients=False) -> ExportSummary

Resources (plain JSON, FHIR 4.0.1; the tests validate each with the `fhir.resources` package):

- ServiceRequest per ordered item (LetsGetChecked order item, Rupa ordered test), `requisition`
  the order;
- DiagnosticReport per result (one per ordered item: its current observations), `basedOn` its
  ServiceRequest, `result` its Observations, `presentedForm`-free (PDFs are DocumentReferences);
- Observation per value: LOINC (or the sender's code system), value (Quantity when a plain
  number, else text), reference range, interpretation (v3 ObservationInterpretation: N, A/H/L,
  AA/HH/LL), status (final, corrected, preliminary, …);
- DocumentReference per Rupa result PDF (the bytes inline, content type application/pdf);
- Patient: by reference to its identifier only (`subject.identifier`, the vendor's patient id),
  unless `with_patients`: then a Patient resource holding that identifier and nothing else.

Ids are stable (`lgc-obs-<hash>`…): a correction exports the same Observation id with status
corrected, so a FHIR server keeps the earlier version as its history.

Incremental: a watermark per target (`fhir_exports`, this module its only writer) holds the
highest `lab_observations.id` exported and when that export started; a run exports the ordered
items with observations recorded or changed since (LetsGetChecked's HL7 filling in the rows its
JSON made), each item whole, so every reference resolves within the run's output. `since`
re-exports the items with observations recorded from then on and leaves the watermark alone.

Output: NDJSON files per resource type in DIR (`Observation.ndjson`, …, replaced by each run that
has something new) with a
bulk-data style `manifest.json` (fhirVersion 4.0.1), or POSTs of one transaction Bundle per
ordered item to FHIR_BASE (entries `PUT Type/id`: idempotent; `LABSYNC_FHIR_TOKEN`, when set, as a
bearer token). Errors name no value: a FHIR server's refusal is reported by its HTTP status.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import Engine

from etl.errors import ApiError, ConfigError
from etl.warehouse.tables import fhir_exports, lab_observations, rupa_results

FHIR_VERSION = "4.0.1"
FHIR_JSON = f"application/fhir+json; fhirVersion={FHIR_VERSION[:3]}"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
TYPES = ("Patient", "ServiceRequest", "DiagnosticReport", "Observation", "DocumentReference")
OBS_STATUS = {"F": "final", "C": "corrected", "P": "preliminary", "R": "preliminary", "S": "preliminary",
              "A": "amended", "I": "registered", "O": "registered", "X": "cancelled",
              "D": "entered-in-error", "W": "entered-in-error", "U": "final"}
REPORT_RANK = ["cancelled", "entered-in-error", "registered", "preliminary", "final", "amended", "corrected"]
_ID_SAFE = re.compile(r"[^A-Za-z0-9\-.]")
_RANGE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*-\s*(-?\d+(?:\.\d+)?)\s*$")


@dataclass
class ExportSummary:
    target: str
    items: int = 0
    resources: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    bundles: int = 0
    watermark: int | None = None

    def line(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.resources.items() if v) or "nothing new"
        return f"export fhir: {self.items} ordered items; {counts}"

    def as_dict(self) -> dict:
        return {"target": self.target, "items": self.items, "resources": self.resources,
                "files": self.files, "bundles": self.bundles, "watermark": self.watermark}


def fhir_id(*parts: object) -> str:
    """A FHIR id ([A-Za-z0-9-.]{1,64}) from a prefix and a stable hash of the parts."""
    prefix, rest = str(parts[0]), "\x1f".join(str(p) for p in parts[1:])
    digest = hashlib.sha256(rest.encode()).hexdigest()[:32]
    return _ID_SAFE.sub("-", f"{prefix}-{digest}")[:64]


def _system(vendor: str, system: str | None) -> str:
    if system and re.match(r"^[a-z][a-z0-9+.\-]*:\S+$", system):
        return system
    name = _ID_SAFE.sub("-", system or "local")
    return f"urn:labsync:{vendor}:code-system:{name}"


def _instant(when: datetime | None) -> str | None:
    if when is None:
        return None
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat(timespec="seconds")


def _subject(vendor: str, patient_id: str | None, with_patients: bool) -> dict:
    if not patient_id:
        return {"display": "patient not identified by the lab"}
    if with_patients:
        return {"reference": f"Patient/{fhir_id(f'{vendor}-patient', patient_id)}"}
    return {"identifier": {"system": f"urn:labsync:{vendor}:patient", "value": patient_id}}


def _interpretation(row) -> list[dict]:
    flags = [f.strip().upper() for f in (row.abnormal_flags or "").split("~") if f.strip()]
    if row.interpretation == "normal":
        code, text = "N", "Normal"
    elif row.interpretation == "critical":
        code = next((f for f in flags if f in ("HH", "LL")), "AA")
        text = {"HH": "Critical high", "LL": "Critical low"}.get(code, "Critical abnormal")
    elif row.interpretation == "abnormal":
        code = next((f for f in flags if f in ("H", "L")), "A")
        text = {"H": "High", "L": "Low"}.get(code, "Abnormal")
    else:
        return []
    return [{"coding": [{"system": INTERPRETATION, "code": code, "display": text}], "text": text}]


def _observation(row, sr_id: str, with_patients: bool) -> dict:
    coding = {"system": _system(row.vendor, row.code_system), "code": row.code or "unknown"}
    if row.name:
        coding["display"] = row.name
    obs: dict = {
        "resourceType": "Observation",
        "id": fhir_id(f"{row.vendor}-obs", row.item_id, row.obs_key),
        "identifier": [{"system": f"urn:labsync:{row.vendor}:observation", "value": f"{row.item_id}/{row.obs_key}"}],
        "basedOn": [{"reference": f"ServiceRequest/{sr_id}"}],
        "status": OBS_STATUS.get((row.status or "F").upper(), "unknown"),
        "category": [{"coding": [{"system": CATEGORY, "code": "laboratory", "display": "Laboratory"}]}],
        "code": {"coding": [coding], **({"text": row.name} if row.name else {})},
        "subject": _subject(row.vendor, row.patient_id, with_patients),
        "issued": _instant(row.recorded_at),
    }
    if row.observed_at is not None:
        obs["effectiveDateTime"] = _instant(row.observed_at)
    if row.numeric_value is not None and row.value_type in (None, "NM", "SN"):
        quantity: dict = {"value": row.numeric_value}
        if row.unit:
            quantity["unit"] = row.unit
        obs["valueQuantity"] = quantity
    elif row.value is not None:
        obs["valueString"] = row.value
    else:
        obs["dataAbsentReason"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                                               "code": "unknown"}]}
    if row.reference_range:
        rng: dict = {"text": row.reference_range}
        m = _RANGE.match(row.reference_range)
        if m:
            for key, number in (("low", m.group(1)), ("high", m.group(2))):
                rng[key] = {"value": float(number), **({"unit": row.unit} if row.unit else {})}
        obs["referenceRange"] = [rng]
    interpretation = _interpretation(row)
    if interpretation:
        obs["interpretation"] = interpretation
    return obs


def _service_request(vendor: str, item_id: str, order_id: str, test: str | None, subject: dict) -> dict:
    return {
        "resourceType": "ServiceRequest",
        "id": fhir_id(f"{vendor}-sr", item_id),
        "identifier": [{"system": f"urn:labsync:{vendor}:order-item", "value": item_id}],
        "requisition": {"system": f"urn:labsync:{vendor}:order", "value": order_id},
        "status": "completed",
        "intent": "order",
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "108252007",
                                  "display": "Laboratory procedure"}]}],
        "code": {"coding": [{"system": f"urn:labsync:{vendor}:test", "code": test}]} if test else {"text": "lab test"},
        "subject": subject,
    }


def _report(vendor: str, item_id: str, sr: dict, obs: list[dict], rows: Sequence, subject: dict) -> dict:
    statuses = [o["status"] for o in obs]
    status = max(statuses, key=lambda s: REPORT_RANK.index(s) if s in REPORT_RANK else -1) if statuses else "unknown"
    if status not in REPORT_RANK:
        status = "unknown"
    if "preliminary" in statuses and "corrected" not in statuses:
        status = "partial"
    report = {
        "resourceType": "DiagnosticReport",
        "id": fhir_id(f"{vendor}-report", item_id),
        "identifier": [{"system": f"urn:labsync:{vendor}:result", "value": item_id}],
        "basedOn": [{"reference": f"ServiceRequest/{sr['id']}"}],
        "status": status,
        "category": [{"coding": [{"system": V2_0074, "code": "LAB", "display": "Laboratory"}]}],
        "code": sr["code"],
        "subject": subject,
        "issued": _instant(max(r.recorded_at for r in rows)),
        "result": [{"reference": f"Observation/{o['id']}"} for o in obs],
    }
    observed = [r.observed_at for r in rows if r.observed_at is not None]
    if observed:
        report["effectiveDateTime"] = _instant(max(observed))
    return report


def _documents(engine: Engine, vendor: str, item_id: str, sr_id: str, subject: dict) -> list[dict]:
    if vendor != "rupa":
        return []
    f = rupa_results
    with engine.connect() as conn:
        pdfs = conn.execute(sa.select(f.c.id, f.c.sha256, f.c.size, f.c.content, f.c.stored_at)
                            .where(f.c.ordered_test_id == item_id, f.c.kind == "pdf").order_by(f.c.id)).all()
    docs = []
    for p in pdfs:
        if not p.content:  # purged by retention
            continue
        docs.append({
            "resourceType": "DocumentReference",
            "id": fhir_id("rupa-doc", p.id),
            "identifier": [{"system": "urn:labsync:rupa:result-file", "value": str(p.id)}],
            "status": "current",
            "type": {"coding": [{"system": "http://loinc.org", "code": "11502-2", "display": "Laboratory report"}]},
            "subject": subject,
            "date": _instant(p.stored_at),
            "content": [{"attachment": {"contentType": "application/pdf", "size": p.size,
                                        "hash": base64.b64encode(hashlib.sha1(p.content).digest()).decode(),
                                        "data": base64.b64encode(p.content).decode(),
                                        "title": f"Result {item_id}"}}],
            "context": {"related": [{"reference": f"ServiceRequest/{sr_id}"}]},
        })
    return docs


def resources(engine: Engine, *, after_id: int = 0, changed_since: datetime | None = None,
              since: datetime | None = None, with_patients: bool = False) -> Iterator[tuple[str, list[dict]]]:
    """(item id, its resources) for every ordered item with observations recorded after the
    watermark (`after_id`; or changed in place since `changed_since`: LetsGetChecked's HL7 filling
    in rows its JSON made), or recorded since `since`; each item whole."""
    t = lab_observations
    newer = t.c.id > after_id
    if changed_since is not None:
        newer = sa.or_(newer, t.c.recorded_at >= changed_since)
    q = sa.select(t.c.vendor, t.c.item_id).where(newer)
    if since is not None:
        q = sa.select(t.c.vendor, t.c.item_id).where(t.c.recorded_at >= since)
    with engine.connect() as conn:
        items = sorted({(v, i) for v, i in conn.execute(q.distinct())})
    for vendor, item_id in items:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(t).where(t.c.vendor == vendor, t.c.item_id == item_id,
                                                   t.c.current.is_(True)).order_by(t.c.id)).all()
        if not rows:
            continue
        first = rows[0]
        subject = _subject(vendor, first.patient_id, with_patients)
        sr = _service_request(vendor, item_id, first.order_id, first.ordered_test, subject)
        obs = [_observation(r, sr["id"], with_patients) for r in rows]
        out: list[dict] = []
        if with_patients and first.patient_id:
            out.append({"resourceType": "Patient", "id": fhir_id(f"{vendor}-patient", first.patient_id),
                        "identifier": [{"system": f"urn:labsync:{vendor}:patient", "value": first.patient_id}]})
        out += [sr, _report(vendor, item_id, sr, obs, rows, subject), *obs,
                *_documents(engine, vendor, item_id, sr["id"], subject)]
        yield item_id, out


def _watermark(engine: Engine, target: str) -> tuple[int, datetime | None]:
    """(the highest observation id exported, when that export started) for `target`."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(fhir_exports.c.last_observation_id, fhir_exports.c.exported_at)
                           .where(fhir_exports.c.target == target)).first()
    return (int(row[0]), row[1]) if row is not None else (0, None)


def _max_id(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.max(lab_observations.c.id))).scalar() or 0)


def _save_watermark(engine: Engine, target: str, last_id: int, started: datetime, count: int) -> None:
    from etl.warehouse import upsert

    row = dict(target=target, last_observation_id=last_id, exported_at=started, resources=count)
    with engine.begin() as conn:
        upsert(conn, fhir_exports, [row], key=["target"], update=["last_observation_id", "exported_at", "resources"])


def export_fhir(engine: Engine, *, out_dir: Path | None = None, url: str | None = None,
                since: datetime | None = None, with_patients: bool = False, http=None) -> ExportSummary:
    """Write NDJSON files to `out_dir`, or POST transaction Bundles to `url` (exactly one)."""
    if (out_dir is None) == (url is None):
        raise ConfigError("export fhir needs exactly one of --out DIR or --url FHIR_BASE")
    if url is not None:
        from etl.settings import check_base_url

        check_base_url("--url", url)  # before anything is read: https (plain http only to loopback)
    target = "ndjson" if out_dir is not None else url.rstrip("/")[:200]  # type: ignore[union-attr]
    started = datetime.now(UTC)  # rows changed from now on go to the next run
    upto = _max_id(engine)
    after, changed_since = (0, None) if since is not None else _watermark(engine, target)
    summary = ExportSummary(target=target, resources={k: 0 for k in TYPES})
    batches = ((item, [r for r in res]) for item, res in resources(
        engine, after_id=after, changed_since=changed_since, since=since, with_patients=with_patients))
    if out_dir is not None:
        _write_ndjson(Path(out_dir), list(batches), summary)
    else:
        _post_bundles(str(url), batches, summary, http=http)
    if since is None:
        _save_watermark(engine, target, max(upto, after), started, sum(summary.resources.values()))
        summary.watermark = max(upto, after)
    return summary


def _write_ndjson(out_dir: Path, batches: list, summary: ExportSummary) -> None:
    """The run's resources replace the files of the previous run in `out_dir`; a run with nothing
    new leaves them as they are."""
    if not batches:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    handles = {}
    seen: set[tuple[str, str]] = set()
    try:
        for _item, res in batches:
            summary.items += 1
            for r in res:
                kind = r["resourceType"]
                if (kind, r["id"]) in seen:  # a Patient shared by several items
                    continue
                seen.add((kind, r["id"]))
                if kind not in handles:
                    handles[kind] = (out_dir / f"{kind}.ndjson").open("w", encoding="utf-8")
                handles[kind].write(json.dumps(r, separators=(",", ":"), ensure_ascii=False) + "\n")
                summary.resources[kind] += 1
    finally:
        for h in handles.values():
            h.close()
    for kind in TYPES:  # files of types this run has nothing for are removed, not left stale
        path = out_dir / f"{kind}.ndjson"
        if kind not in handles and path.exists():
            path.unlink()
    summary.files = [f"{k}.ndjson" for k in TYPES if k in handles]
    manifest = {"transactionTime": _instant(datetime.now(UTC)), "fhirVersion": FHIR_VERSION,
                "requiresAccessToken": False,
                "output": [{"type": k, "url": f"{k}.ndjson", "count": summary.resources[k]} for k in TYPES if k in handles],
                "error": []}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def bundle(res: list[dict]) -> dict:
    """One transaction Bundle: every resource PUT at its own id (a repeat changes nothing)."""
    return {"resourceType": "Bundle", "type": "transaction",
            "entry": [{"fullUrl": f"urn:uuid:{_uuid(r)}", "resource": r,
                       "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in res]}


def _uuid(r: dict) -> str:
    h = hashlib.sha256(f"{r['resourceType']}/{r['id']}".encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _post_bundles(url: str, batches, summary: ExportSummary, *, http=None) -> None:
    import httpx

    from etl.http import make_client
    from etl.settings import RetrySettings, check_base_url

    check_base_url("--url", url)  # https (plain http only to loopback): the bundles carry PHI
    headers = {"Content-Type": FHIR_JSON, "Accept": "application/fhir+json"}
    token = os.environ.get("LABSYNC_FHIR_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    own = http is None
    client = http or make_client(url, RetrySettings(timeout=60.0), concurrency=1)  # the one client factory
    try:
        for _item, res in batches:
            try:
                answer = client.post(url.rstrip("/") + "/", content=json.dumps(bundle(res)), headers=headers)
            except httpx.HTTPError as exc:
                raise ApiError(f"the FHIR server could not be reached ({type(exc).__name__}); "
                               "nothing was marked exported; the next run sends it again") from None
            if answer.status_code >= 300:
                raise ApiError(f"the FHIR server refused a transaction bundle (HTTP {answer.status_code}); "
                               "nothing was marked exported; the next run sends it again")
            summary.items += 1
            summary.bundles += 1
            for r in res:
                summary.resources[r["resourceType"]] += 1
    finally:
        if own:
            client.close()
