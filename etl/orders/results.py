"""LetsGetChecked results into the warehouse: raw JSON and HL7 kept as received, values parsed.

    fetch_results(engine, settings) -> ResultsSummary

For every item at ResultsAvailable with a barcode and no stored result, GET the results JSON
(`api/v1/results/{barcode}?alphaCode=…`) and the HL7 2.3 ORU^R01 message
(`api/v1/labresults/{barcode}`, Accept: application/hl7), and store them in `lgc_results` (raw
bytes + sha256) with one `lgc_result_values` row per biomarker. A 404 means "not released yet":
nothing is stored and the next run asks again. A result whose HL7 was not there yet is
completed by a later run. Storing is idempotent: the row is inserted once (ON CONFLICT DO
NOTHING on the barcode) and its values only by the run that inserted it, so however often this
runs, concurrently or not, each result is stored once.

Results are PHI. Nothing here logs or raises with a biomarker, a value or a document; log lines
name the clientOrderId and the item id. A result the database refuses to store (a constraint, a
value it cannot hold), or a document the parser trips on, fails that item alone, with the error's
class and a plain reason; the run goes on and the next run asks again.

Parsing is tolerant because LetsGetChecked publishes the field names but not every shape:
the value comes from `quantitativeValue`, `qualitativeValue`, `value` or `values[]`; the unit
from `unitOfMeasure`/`unit`; the range from `lowerBound`/`upperBound` (or `referenceRange`);
LOINC from a `coding[]` entry whose system names LOINC (or `loinc`/`loincCode`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.dialects import postgresql, sqlite

from etl.errors import ApiError, LabsyncError, WarehouseRefused
from etl.lgc.orders_api import get_field, open_session, text_of
from etl.orders.lifecycle import mark_results_stored, run_async
from etl.results import observations
from etl.settings import Settings
from etl.states import ItemStatus
from etl.warehouse import as_refused
from etl.warehouse.tables import lgc_order_items, lgc_result_values, lgc_results

log = logging.getLogger(__name__)

items_t, results_t, values_t = lgc_order_items, lgc_results, lgc_result_values


# ---- parsing --------------------------------------------------------------------------------

def _scalar(value: Any) -> str | None:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value) if isinstance(value, float) else str(value)
    return text_of(value, 10_000)


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number == number and abs(number) != float("inf") else None


def _loinc(result: Mapping) -> str | None:
    direct = text_of(get_field(result, "loinc", "loincCode"), 20)
    if direct:
        return direct
    coding = get_field(result, "coding", "codings", "code")
    entries = coding if isinstance(coding, list) else [coding] if isinstance(coding, Mapping) else []
    for entry in entries:
        system = str(get_field(entry, "system") or "").casefold()
        if "loinc" in system:
            return text_of(get_field(entry, "code"), 20)
    return None


def _value_and_unit(result: Mapping) -> tuple[str | None, str | None]:
    unit = text_of(get_field(result, "unitOfMeasure", "unit", "units"), 50)
    for key in ("quantitativeValue", "qualitativeValue", "value", "result"):
        value = get_field(result, key)
        if value is not None and not isinstance(value, Mapping | list):
            return _scalar(value), unit
    values = get_field(result, "values")
    if isinstance(values, Mapping):
        values = [values]
    if isinstance(values, list) and values:
        texts = []
        for v in values:
            if isinstance(v, Mapping):
                unit = unit or text_of(get_field(v, "unitOfMeasure", "unit", "units"), 50)
                v = get_field(v, "value", "quantitativeValue", "qualitativeValue")
            text = _scalar(v)
            if text is not None:
                texts.append(text)
        return ("; ".join(texts) or None), unit
    return None, unit


def parse_results(document: bytes) -> list[dict]:
    """One dict per `testResults[]` entry (columns of `lgc_result_values`). ValueError if the
    document is not JSON or has no testResults list (it is stored raw, unparsed). ApiError if
    it is nested too deeply for Python's parser: nothing is stored, that item alone fails (its
    reason names no content) and the next run asks again."""
    try:
        data = json.loads(document)
    except RecursionError:
        raise ApiError("the results document is nested too deeply to read; not stored") from None
    results = get_field(data, "testResults")
    if not isinstance(results, list):
        raise ValueError("no testResults list")
    rows: list[dict[str, Any]] = []
    for position, r in enumerate(results):
        if not isinstance(r, Mapping):
            continue
        value, unit = _value_and_unit(r)
        rng = get_field(r, "referenceRange") or {}
        rows.append(dict(
            position=position,
            biomarker_name=text_of(get_field(r, "biomarkerName", "name"), 10_000),
            test_code=text_of(get_field(r, "testCode"), 100),
            kind=text_of(get_field(r, "kind"), 40),
            descriptor=text_of(get_field(r, "descriptor"), 100),
            value=value,
            numeric_value=_number(value),
            unit=unit,
            lower_bound=_scalar(get_field(r, "lowerBound")) or _scalar(get_field(rng, "low", "lower")),
            upper_bound=_scalar(get_field(r, "upperBound")) or _scalar(get_field(rng, "high", "upper")),
            loinc=_loinc(r),
            headline=text_of(get_field(r, "headline"), 10_000),
            description=text_of(get_field(r, "description"), 100_000),
        ))
    for row in rows:  # the String columns' limits
        for key, limit in (("lower_bound", 50), ("upper_bound", 50)):
            if row[key] is not None:
                row[key] = row[key][:limit]
    return rows


# ---- fetching -------------------------------------------------------------------------------

@dataclass
class ResultsSummary:
    candidates: int = 0  # items at ResultsAvailable without a (complete) stored result
    stored: int = 0  # results stored by this run
    values: int = 0  # biomarker rows stored by this run
    hl7_added: int = 0  # HL7 messages added to results stored earlier without one
    not_released: int = 0  # 404: not released yet; asked again next run
    unparsed: int = 0  # stored raw, but the JSON had no readable testResults
    failed: dict[str, str] = field(default_factory=dict)  # item id -> PHI-free reason
    elapsed: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def line(self) -> str:
        return (f"results: {self.stored} stored ({self.values} values), {self.hl7_added} HL7 added, "
                f"{self.not_released} not released yet, {len(self.failed)} failed"
                + (f", {self.unparsed} unparsed" if self.unparsed else ""))

    def as_dict(self) -> dict:
        return {"candidates": self.candidates, "stored": self.stored, "values": self.values,
                "hl7_added": self.hl7_added, "not_released": self.not_released,
                "unparsed": self.unparsed, "failed": len(self.failed), "elapsed": round(self.elapsed, 3)}


@dataclass(frozen=True)
class _Candidate:
    item_id: str
    client_order_id: str
    barcode: str
    alpha_code: str | None
    has_json: bool  # a result row exists (its HL7 is missing)


def candidates_query() -> sa.Select:
    """The items whose results may be due: at ResultsAvailable, with a barcode, and without
    `results_stored_at` (set once both documents are stored), read through the index on
    (status, results_stored_at): a run reads the results still due, not the history
    (tests/test_scale_plans.py and bench/scale.py EXPLAIN it)."""
    return (sa.select(items_t.c.item_id, items_t.c.client_order_id, items_t.c.barcode, items_t.c.alpha_code)
            .where(items_t.c.status == ItemStatus.RESULTS_AVAILABLE.value, items_t.c.results_stored_at.is_(None),
                   items_t.c.barcode.is_not(None))
            .order_by(items_t.c.client_order_id, items_t.c.item_id))


def candidates(engine: Engine) -> list[_Candidate]:
    """Items at ResultsAvailable with a barcode whose result is not stored, or stored without HL7:
    the due items (`candidates_query`), then what is stored of them, read by barcode (a join
    would leave PostgreSQL to estimate the due items, which it cannot, and hash every result)."""
    r = results_t
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            # PostgreSQL estimates the due items as ResultsAvailable x no results stored, as if
            # unrelated: thousands of rows on a long history, so it would start parallel
            # workers (milliseconds each) to read the handful that are due
            conn.exec_driver_sql("SET LOCAL max_parallel_workers_per_gather = 0")
        due = conn.execute(candidates_query()).all()
        barcodes = sorted({x.barcode for x in due})
        stored: dict[str, bool] = {}  # barcode -> its HL7 is stored
        for i in range(0, len(barcodes), 500):
            stored.update(conn.execute(sa.select(r.c.barcode, r.c.hl7_body.is_not(None))
                                       .where(r.c.barcode.in_(barcodes[i:i + 500]))).tuples().all())
    complete = sorted(b for b, hl7 in stored.items() if hl7)
    if complete:  # stored whole by a run that raced this one's read: never read again
        with engine.begin() as conn:
            for barcode in complete:
                mark_results_stored(conn, barcode, datetime.now(UTC))
    return [_Candidate(x.item_id, x.client_order_id, x.barcode, x.alpha_code, x.barcode in stored)
            for x in due if not stored.get(x.barcode, False)]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def store_result(engine: Engine, c: _Candidate, document: bytes, hl7: bytes | None, *,
                 now: datetime | None = None) -> tuple[bool, int, bool]:
    """Insert the result once; returns (inserted, values stored, parsed). A second call for the
    same barcode (another run, a retry) inserts nothing."""
    now = now or datetime.now(UTC)
    try:
        rows, parsed = parse_results(document), True
    except ValueError:
        rows, parsed = [], False
    except ApiError:
        raise
    except Exception as exc:  # a parser bug on this document: this item fails, nothing of it shown
        raise ApiError(f"the results document could not be read ({type(exc).__name__}); not stored") from None
    with _plain_refusal(c.item_id), engine.begin() as conn:
        insert = postgresql.insert(results_t) if conn.dialect.name == "postgresql" else sqlite.insert(results_t)
        inserted = conn.execute(
            insert.values(barcode=c.barcode, item_id=c.item_id, client_order_id=c.client_order_id,
                          alpha_code=c.alpha_code, json_body=document, json_sha256=_sha(document),
                          hl7_body=hl7, hl7_sha256=_sha(hl7) if hl7 is not None else None,
                          fetched_at=now, hl7_fetched_at=now if hl7 is not None else None,
                          value_count=len(rows))
            .on_conflict_do_nothing(index_elements=["barcode"]).returning(results_t.c.barcode)
        ).scalar()
        if inserted is None:
            return False, 0, parsed
        if rows:
            conn.execute(sa.insert(values_t), [{"barcode": c.barcode, **row} for row in rows])
        if hl7 is not None:  # both documents: no longer a candidate
            mark_results_stored(conn, c.barcode, now)
    return True, len(rows), parsed


@contextlib.contextmanager
def _plain_refusal(item_id: str) -> Iterator[None]:
    """A write the database refuses becomes WarehouseRefused naming the item and the error's
    class (WarehouseUnavailable when the warehouse is down): the driver's text, which can quote
    a biomarker and its value, is dropped. The transaction inside is rolled back: nothing of the
    result is stored and the next run asks again."""
    try:
        yield
    except sa.exc.StatementError as exc:
        plain = as_refused(exc, f"the results of item {item_id} (tables lgc_results, lgc_result_values)")
        if plain is None:
            raise
        raise plain from None


def add_hl7(engine: Engine, barcode: str, hl7: bytes, *, now: datetime | None = None) -> bool:
    """Fill in the HL7 of a result stored without one (once)."""
    now = now or datetime.now(UTC)
    with _plain_refusal(f"with barcode {barcode}"), engine.begin() as conn:
        added = bool(conn.execute(
            sa.update(results_t).where(results_t.c.barcode == barcode, results_t.c.hl7_body.is_(None))
            .values(hl7_body=hl7, hl7_sha256=_sha(hl7), hl7_fetched_at=now)).rowcount)
        if added:  # both documents: no longer a candidate
            mark_results_stored(conn, barcode, now)
        return added


def fetch_results(engine: Engine, settings: Settings, *,
                  transport: httpx.AsyncBaseTransport | None = None) -> ResultsSummary:
    """Fetch and store every result that is due (see `candidates`). Idempotent."""
    return run_async(afetch_results(engine, settings, transport=transport))


async def afetch_results(engine: Engine, settings: Settings, *,
                         transport: httpx.AsyncBaseTransport | None = None) -> ResultsSummary:
    started = asyncio.get_running_loop().time()
    summary = ResultsSummary()
    due = await asyncio.to_thread(candidates, engine)
    summary.candidates = len(due)
    if not due:
        return summary
    async with open_session(settings, engine=engine, transport=transport) as session:
        async def one(api, c: _Candidate) -> None:
            try:
                await fetch_one(api, c)
            except WarehouseRefused as exc:  # this item failed; the others go on
                failed(c, exc)

        async def fetch_one(api, c: _Candidate) -> None:
            if c.has_json:
                hl7 = await api.get_lab_results_hl7(c.barcode, c.alpha_code)
                if hl7 is not None and await asyncio.to_thread(add_hl7, engine, c.barcode, hl7):
                    summary.hl7_added += 1
                    await asyncio.to_thread(observations.record_lgc, engine, c.barcode)  # issue 26
                    log.info("order %s item %s: HL7 results added", c.client_order_id, c.item_id)
                return
            document = await api.get_results(c.barcode, c.alpha_code)
            if document is None:
                summary.not_released += 1
                log.info("order %s item %s: results not released yet", c.client_order_id, c.item_id)
                return
            hl7 = await api.get_lab_results_hl7(c.barcode, c.alpha_code)
            inserted, values, parsed = await asyncio.to_thread(store_result, engine, c, document, hl7)
            if not inserted:
                return  # another run stored it first
            await asyncio.to_thread(observations.record_lgc, engine, c.barcode)  # lab_observations (issue 26)
            summary.stored += 1
            summary.values += values
            summary.unparsed += 0 if parsed else 1
            if not parsed:
                log.warning("order %s item %s: results stored raw; the JSON has no readable testResults",
                            c.client_order_id, c.item_id)
            log.info("order %s item %s: results stored (%d values%s)", c.client_order_id, c.item_id,
                     values, "" if hl7 is not None else ", HL7 not released yet")

        def failed(c: _Candidate, exc: LabsyncError) -> None:
            summary.failed[c.item_id] = str(exc)
            log.warning("order %s item %s: results not fetched: %s", c.client_order_id, c.item_id, exc)

        await session.for_each(due, one, failed)
    summary.elapsed = asyncio.get_running_loop().time() - started
    log.info("lifecycle: %s", summary.line())
    return summary
