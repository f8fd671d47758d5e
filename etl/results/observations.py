"""One table of lab observations across both vendors: `lab_observations` (its only writer).

    record_lgc(engine, barcode) -> int        after LetsGetChecked's results are stored (JSON, HL7)
    record_rupa(engine, result_id) -> int     after a Rupa HL7 file is stored in rupa_results
    record_all(engine) -> int                 every stored document again (a backfill; idempotent)
    flagged(engine, levels) -> list[dict]     current observations flagged critical (or abnormal)
    pending_events(engine, levels) / mark_notified(engine, ids)   the flag events (DAG tasks)

Rules:
- one row per observation per result version. LetsGetChecked's JSON (`lgc_result_values`, parsed
  when stored) and its HL7 2.3 message are two views of one result (`result_key` lgc:<barcode>):
  they are merged into the same rows (HL7's status, flags and times, the JSON's names and ranges
  where HL7 has none) and both are named in `sources`. Rupa's HL7 2.5.1 files are one result each
  (`result_key` rupa_results:<id>).
- an observation is identified within its ordered item by `obs_key` (LOINC when given, else the
  sender's code; OBX-4's sub-id; the OBR's test when a message has several OBR groups);
- storing is idempotent: a document recorded again adds nothing; a document that says the same
  as the current row adds only its name to `sources`; one that says something else (a correction,
  OBX-11 C, or a new version of the result) inserts a new current row and marks the earlier one
  superseded (`current` false, `superseded_by`, `superseded_at`): history is kept;
- LetsGetChecked's Client Order ID travels as an ask-at-order-entry OBX (its contract): it is not
  an observation and is left out.

Values are PHI: nothing here logs or raises with a value, a name or a document. Recording never
fails the storing of results: a document the parser cannot read is logged by its ids and error
class, and is recorded by `record_all` once the parser can read it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection, Iterable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from etl.results.hl7 import (
    CRITICAL,
    LOINC,
    SEVERITY,
    UNKNOWN,
    Report,
    interpret_word,
    parse_oru,
)
from etl.warehouse.tables import (
    lab_observations,
    lgc_order_items,
    lgc_result_values,
    lgc_results,
    rupa_ordered_tests,
    rupa_orders,
    rupa_results,
)

log = logging.getLogger(__name__)

obs_t = lab_observations
LGC, RUPA = "lgc", "rupa"
AOE_CODES = {"CLIENTORDERID"}  # LetsGetChecked: "The Client Order ID displays in the HL7 results as an AOE OBX segment"
CONTENT = ("code", "code_system", "name", "value", "value_type", "unit", "reference_range",
           "abnormal_flags", "interpretation", "status")
FLAG_LEVELS = {CRITICAL: (CRITICAL,), "abnormal": ("abnormal", CRITICAL)}


FLAG_LEVEL_ENV = "LABSYNC_RESULTS_FLAG_LEVEL"


def levels_for(level: str | None = None) -> tuple[str, ...]:
    """The interpretations that need a person: `level`, else LABSYNC_RESULTS_FLAG_LEVEL, else
    critical. `critical`: critical only; `abnormal`: abnormal and critical. ConfigError otherwise."""
    import os

    from etl.errors import ConfigError

    chosen = (level or os.environ.get(FLAG_LEVEL_ENV) or CRITICAL).strip().lower()
    try:
        return FLAG_LEVELS[chosen]
    except KeyError:
        raise ConfigError(f"{FLAG_LEVEL_ENV} / --level must be critical or abnormal, not {chosen!r}") from None


def _cut(text: str | None, limit: int) -> str | None:
    return text[:limit] if text is not None else None


def _content_sha(row: dict) -> str:
    return hashlib.sha256(json.dumps([row.get(k) for k in CONTENT], default=str).encode()).hexdigest()


def _key(system: str | None, code: str | None, sub_id: str | None = None, group: str | None = None) -> str:
    key = f"{system or ''}|{code or ''}" + (f"#{sub_id}" if sub_id else "")
    return (f"{group}/" if group else "") + key


def _hl7_rows(report: Report, *, skip_codes: Collection[str] = frozenset()) -> list[dict]:
    """One row (the table's columns, without the ids) per OBX."""
    several = len([g for g in report.groups if g.observations]) > 1
    rows: list[dict] = []
    seen: dict[str, int] = {}
    for group, o in report.observations:
        if (o.code or "").upper() in skip_codes or (o.local_code or "").upper() in skip_codes:
            continue
        key = _key(o.code_system, o.code, o.sub_id, group.test_code if several else None)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:  # the same code twice in a group (no sub-id): keep both
            key = f"{key}@{seen[key]}"
        rows.append(dict(
            obs_key=key[:300], code=_cut(o.code, 100), code_system=_cut(o.code_system, 200), name=o.name,
            value=o.value, value_type=_cut(o.value_type, 10), numeric_value=o.numeric_value,
            unit=_cut(o.unit, 50), reference_range=_cut(o.reference_range, 200),
            abnormal_flags=_cut(o.abnormal_flags, 100), interpretation=o.interpretation,
            status=_cut(o.status, 5), observed_at=o.observed_at,
            ordered_test=_cut(group.test_code, 200)))
    return rows


# ---- LetsGetChecked ---------------------------------------------------------------------------
def _lgc_json_rows(values: Iterable[Any]) -> list[dict]:
    rows = []
    for v in values:
        code, system = (v.loinc, LOINC) if v.loinc else (v.test_code, None)
        rng = (f"{v.lower_bound or ''}-{v.upper_bound or ''}"
               if v.lower_bound is not None or v.upper_bound is not None else None)
        rows.append(dict(
            obs_key=_key(system, code)[:300], code=code, code_system=system, name=v.biomarker_name,
            value=v.value, value_type="NM" if v.numeric_value is not None else "ST",
            numeric_value=v.numeric_value, unit=v.unit, reference_range=_cut(rng, 200),
            abnormal_flags=_cut(v.descriptor, 100), interpretation=interpret_word(v.descriptor),
            status="F", observed_at=None, ordered_test=None))
    return rows


def _merge_lgc(json_rows: list[dict], hl7_rows: list[dict]) -> list[dict]:
    """The JSON's and the HL7's rows of one result, one row per observation: HL7's reading where
    it has one (status, flags, time, value as sent), the JSON's where HL7 says nothing."""
    by_key = {r["obs_key"]: dict(r, views=["json"]) for r in json_rows}
    for h in hl7_rows:
        j = by_key.get(h["obs_key"])
        if j is None:
            by_key[h["obs_key"]] = dict(h, views=["hl7"])
            continue
        merged = dict(j)
        for k, v in h.items():
            if v is not None and k not in ("name", "interpretation"):
                merged[k] = v
        merged["name"] = j["name"] or h["name"]
        merged["interpretation"] = (h["interpretation"] if SEVERITY[h["interpretation"]] > 0
                                    else j["interpretation"])
        merged["views"] = ["json", "hl7"]
        by_key[h["obs_key"]] = merged
    return list(by_key.values())


def record_lgc(engine: Engine, barcode: str) -> int:
    """The observations of one stored LetsGetChecked result (its JSON values and, once stored,
    its HL7). Returns the rows inserted or changed. Never raises: see the module's docstring."""
    try:
        return _record_lgc(engine, barcode)
    except Exception as exc:  # the result stays stored; recorded by record_all later
        log.warning("lab observations: result %s not recorded (%s); recorded again later", barcode,
                    type(exc).__name__)
        return 0


def _record_lgc(engine: Engine, barcode: str) -> int:
    r, v = lgc_results, lgc_result_values
    with engine.connect() as conn:
        res = conn.execute(sa.select(r.c.item_id, r.c.client_order_id, r.c.json_sha256, r.c.hl7_body,
                                     r.c.hl7_sha256, lgc_order_items.c.code)
                           .select_from(r.outerjoin(lgc_order_items, lgc_order_items.c.item_id == r.c.item_id))
                           .where(r.c.barcode == barcode)).first()
        if res is None:
            return 0
        values = conn.execute(sa.select(v).where(v.c.barcode == barcode).order_by(v.c.position)).all()
    json_rows = _lgc_json_rows(values)
    hl7_rows: list[dict] = []
    patient = None
    if res.hl7_body:
        report = parse_oru(res.hl7_body)
        hl7_rows = _hl7_rows(report, skip_codes=AOE_CODES)
        patient = report.patient_id
    sources = {"json": {"table": "lgc_results", "key": barcode, "view": "json", "sha256": res.json_sha256},
               "hl7": {"table": "lgc_results", "key": barcode, "view": "hl7", "sha256": res.hl7_sha256}}
    rows = []
    for row in _merge_lgc(json_rows, hl7_rows):
        views = row.pop("views")
        row.update(ordered_test=_cut(res.code, 200) or row.get("ordered_test"), patient_id=_cut(patient, 100),
                   sources=[sources[k] for k in views])
        rows.append(row)
    return _store(engine, LGC, res.client_order_id, res.item_id, f"lgc:{barcode}", rows)


# ---- Rupa -------------------------------------------------------------------------------------
def record_rupa(engine: Engine, result_id: int) -> int:
    """The observations of one stored Rupa HL7 file (`rupa_results.id`). Never raises."""
    try:
        return _record_rupa(engine, result_id)
    except Exception as exc:
        log.warning("lab observations: Rupa result file %s not recorded (%s); recorded again later",
                    result_id, type(exc).__name__)
        return 0


def _record_rupa(engine: Engine, result_id: int) -> int:
    f = rupa_results
    with engine.connect() as conn:
        res = conn.execute(sa.select(f.c.ordered_test_id, f.c.order_id, f.c.kind, f.c.sha256, f.c.content,
                                     rupa_orders.c.patient_id, rupa_ordered_tests.c.lab_test_id)
                           .select_from(f.outerjoin(rupa_orders, rupa_orders.c.id == f.c.order_id)
                                        .outerjoin(rupa_ordered_tests, rupa_ordered_tests.c.id == f.c.ordered_test_id))
                           .where(f.c.id == result_id)).first()
    if res is None or res.kind != "hl7" or not res.content:
        return 0
    report = parse_oru(res.content)
    source = {"table": "rupa_results", "key": str(result_id), "view": "hl7", "sha256": res.sha256}
    rows = []
    for row in _hl7_rows(report):
        row.update(ordered_test=_cut(res.lab_test_id, 200) or row["ordered_test"],
                   patient_id=_cut(res.patient_id or report.patient_id, 100), sources=[source])
        rows.append(row)
    return _store(engine, RUPA, res.order_id, res.ordered_test_id, f"rupa_results:{result_id}", rows)


def record_all(engine: Engine) -> int:
    """Every stored result document recorded again (documents stored before this table existed,
    or that failed to parse): idempotent, adds only what is missing."""
    with engine.connect() as conn:
        barcodes = conn.execute(sa.select(lgc_results.c.barcode).order_by(lgc_results.c.fetched_at)).scalars().all()
        files = conn.execute(sa.select(rupa_results.c.id).where(rupa_results.c.kind == "hl7")
                             .order_by(rupa_results.c.id)).scalars().all()
    return sum(record_lgc(engine, b) for b in barcodes) + sum(record_rupa(engine, i) for i in files)


# ---- storing ----------------------------------------------------------------------------------
def _merged_sources(old: list, new: list) -> list:
    out = list(old or [])
    for s in new:
        if s not in out:
            out.append(s)
    return out


def _store(engine: Engine, vendor: str, order_id: str, item_id: str, result_key: str, rows: list[dict]) -> int:
    if not rows:
        return 0
    now = datetime.now(UTC)
    changed = 0
    with engine.begin() as conn:
        for row in rows:
            row["content_sha256"] = _content_sha(row)
            changed += _store_one(conn, vendor, order_id, item_id, result_key, row, now)
    return changed


def _store_one(conn: Connection, vendor: str, order_id: str, item_id: str, result_key: str, row: dict,
               now: datetime) -> int:
    t = obs_t
    same_item = sa.and_(t.c.vendor == vendor, t.c.item_id == item_id, t.c.obs_key == row["obs_key"])
    mine = conn.execute(sa.select(t.c.id, t.c.content_sha256, t.c.sources, t.c.interpretation)
                        .where(same_item, t.c.result_key == result_key)).first()
    if mine is not None:  # this result again, or a second view of it (LGC's HL7 after its JSON)
        sources = _merged_sources(mine.sources, row["sources"])
        if mine.content_sha256 == row["content_sha256"] and sources == (mine.sources or []):
            return 0
        changes = {k: row[k] for k in row if k not in ("obs_key", "sources")}
        changes["recorded_at"] = now  # changed: the FHIR export sends it again
        if row["interpretation"] != mine.interpretation:  # reported again under its new reading
            changes["notified_at"] = None
        conn.execute(sa.update(t).where(t.c.id == mine.id).values(**changes, sources=sources))
        return 1
    current = conn.execute(sa.select(t.c.id, t.c.content_sha256, t.c.sources)
                           .where(same_item, t.c.current.is_(True))).first()
    if current is not None and current.content_sha256 == row["content_sha256"]:
        sources = _merged_sources(current.sources, row["sources"])  # says the same: a repeat
        if sources != (current.sources or []):
            conn.execute(sa.update(t).where(t.c.id == current.id).values(sources=sources))
        return 0
    new_id = conn.execute(sa.insert(t).values(
        vendor=vendor, order_id=order_id, item_id=item_id, result_key=result_key, current=True,
        recorded_at=now, **row).returning(t.c.id)).scalar_one()
    if current is not None:  # a correction: the earlier version is kept as history
        conn.execute(sa.update(t).where(t.c.id == current.id).values(
            current=False, superseded_by=new_id, superseded_at=now))
    return 1


def purge_documents(conn: Connection, barcodes: Iterable[str], rupa_result_ids: Iterable[int]) -> int:
    """Drop the observations read from result documents the retention purge blanks (etl.retention,
    inside its transaction): LetsGetChecked results by barcode, Rupa HL7 files by id."""
    keys = [f"lgc:{b}" for b in barcodes] + [f"rupa_results:{i}" for i in rupa_result_ids]
    if not keys:
        return 0
    return conn.execute(sa.delete(obs_t).where(obs_t.c.result_key.in_(keys))).rowcount


# ---- flags ------------------------------------------------------------------------------------
FLAG_COLUMNS = ("id", "vendor", "order_id", "item_id", "ordered_test", "code", "code_system", "name",
                "interpretation", "abnormal_flags", "status", "observed_at", "recorded_at")


def flagged(engine: Engine, levels: tuple[str, ...] = (CRITICAL,), *, since: datetime | None = None) -> list[dict]:
    """Current observations whose interpretation is in `levels` (newest first). No values."""
    t = obs_t
    q = (sa.select(*[t.c[c] for c in FLAG_COLUMNS])
         .where(t.c.current.is_(True), t.c.interpretation.in_(levels))
         .order_by(t.c.recorded_at.desc(), t.c.id.desc()))
    if since is not None:
        q = q.where(t.c.recorded_at >= since)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def pending_events(engine: Engine, levels: tuple[str, ...] = (CRITICAL,), *, limit: int = 1000) -> list[dict]:
    """Flagged current observations not reported as an event yet (ids and codes only: an event's
    extras name no value and no patient)."""
    t = obs_t
    q = (sa.select(t.c.id, t.c.vendor, t.c.order_id, t.c.item_id, t.c.code, t.c.code_system,
                   t.c.interpretation, t.c.status)
         .where(t.c.current.is_(True), t.c.interpretation.in_(levels), t.c.notified_at.is_(None))
         .order_by(t.c.id).limit(limit))
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def mark_notified(engine: Engine, ids: Iterable[int]) -> int:
    ids = list(ids)
    if not ids:
        return 0
    with engine.begin() as conn:
        return conn.execute(sa.update(obs_t).where(obs_t.c.id.in_(ids), obs_t.c.notified_at.is_(None))
                            .values(notified_at=datetime.now(UTC))).rowcount


def counts(engine: Engine) -> dict[str, int]:
    """Current observations per vendor (the demo, the tests)."""
    t = obs_t
    with engine.connect() as conn:
        return {v: n for v, n in conn.execute(sa.select(t.c.vendor, sa.func.count())
                                              .where(t.c.current.is_(True)).group_by(t.c.vendor))}


def verify(engine: Engine) -> dict[str, dict[str, int]]:
    """Each vendor's current observations checked against the stored documents they came from
    (the demo prints this; counts only): LetsGetChecked's per result (its parsed JSON values and
    its HL7's OBX, the Client Order ID AOE aside), Rupa's per ordered test (its newest HL7 file).
    Returns {vendor: {"documents", "observations", "matched"}}."""
    out = {LGC: {"documents": 0, "observations": 0, "matched": 0}, RUPA: {"documents": 0, "observations": 0, "matched": 0}}
    t = obs_t
    with engine.connect() as conn:
        current = conn.execute(sa.select(t.c.vendor, t.c.item_id, t.c.result_key, t.c.obs_key, t.c.value,
                                         t.c.numeric_value).where(t.c.current.is_(True))).all()
        lgc_docs = conn.execute(sa.select(lgc_results.c.barcode, lgc_results.c.item_id, lgc_results.c.hl7_body)).all()
        lgc_vals = conn.execute(sa.select(lgc_result_values)).all()
        rupa_docs = conn.execute(sa.select(rupa_results.c.id, rupa_results.c.ordered_test_id, rupa_results.c.content)
                                 .where(rupa_results.c.kind == "hl7").order_by(rupa_results.c.id)).all()
    rows = {(r.vendor, r.item_id, r.obs_key): r for r in current}
    for doc in lgc_docs:
        expected = {row["obs_key"]: row for row in _merge_lgc(
            _lgc_json_rows([v for v in lgc_vals if v.barcode == doc.barcode]),
            _hl7_rows(parse_oru(doc.hl7_body), skip_codes=AOE_CODES) if doc.hl7_body else [])}
        _tally(out[LGC], rows, LGC, doc.item_id, expected)
    newest = {d.ordered_test_id: d for d in rupa_docs if d.content}
    for doc in newest.values():
        expected = {row["obs_key"]: row for row in _hl7_rows(parse_oru(doc.content))}
        _tally(out[RUPA], rows, RUPA, doc.ordered_test_id, expected)
    return out


def _tally(counts: dict, rows: dict, vendor: str, item_id: str, expected: dict) -> None:
    counts["documents"] += 1
    counts["observations"] += len(expected)
    for key, want in expected.items():
        got = rows.get((vendor, item_id, key))
        if got is not None and got.value == want["value"] and got.numeric_value == want["numeric_value"]:
            counts["matched"] += 1


__all__ = ["record_lgc", "record_rupa", "record_all", "flagged", "pending_events", "mark_notified",
           "counts", "levels_for", "verify", "UNKNOWN"]
