"""The functions the Airflow DAGs call, one per task. Each reads its settings from Airflow
Connections (falling back to the environment), does one thing in `etl/`, and returns a small,
JSON-safe, PHI-free dict for XCom. Nothing here imports Airflow at module level.

Claims are owned by the Airflow task instance that works (etl.claims): `load` claims its rows as
`ti:{dag}/{run}/{task}/{map_index}` (a retry of the same task instance takes them over at once),
and a DAG run holds the inbox files it processes, from `prepare` to `finish`, as `run:{dag}/{run}`.
The identity comes from the running task's context, or from the arguments (tests, other callers).

Errors reach Airflow as our own exception types with one plain sentence: a warehouse that went
away mid-task says so (WarehouseUnavailable), not a driver traceback.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict
from datetime import UTC, datetime

import etl.airflow.storage  # noqa: F401  (an inbox connection id goes through Airflow)
from etl.errors import ConfigError
from etl.settings import Settings

log = logging.getLogger(__name__)


def airflow_settings(*, require: tuple[str, ...] = ()) -> Settings:
    """The task's settings: the environment overlaid with the Airflow Connections
    (etl.airflow.settings.task_settings, imported here so this module loads without Airflow). A
    task that talks to a vendor named in `require` ("lgc", "rupa") with neither its Connection nor
    its base-URL variable fails with a message naming both."""
    try:
        from etl.airflow.settings import task_settings
    except ImportError as exc:  # pragma: no cover - the DAGs always have Airflow
        raise ConfigError("Airflow is not installed; use Settings.from_env()") from exc
    return task_settings(require=require)


def _engine(settings: Settings):
    from etl import audit, logs, warehouse

    # Airflow configures the handlers; labsync's records still pass the redaction point, and
    # httpx's request lines (full URLs: ids, signed result links) stay out of the task logs
    logs.install()
    # the audit trail names this task instance as who acted (etl.audit), not the worker's OS user
    audit.set_process_actor(task_actor())

    return warehouse.connect(settings.warehouse_url)


def task_actor() -> str | None:
    """`airflow:<dag_id>.<task_id>.<run_id>.<try>` of the running task (None outside a task)."""
    try:
        from airflow.sdk import get_current_context

        ti = get_current_context()["ti"]
    except Exception:  # not inside a task (a test calling the function, a shell)
        return None
    from etl import audit

    return audit.airflow_actor(ti.dag_id, ti.task_id, ti.run_id, getattr(ti, "try_number", None),
                               getattr(ti, "map_index", -1))


def _plain_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            from etl.warehouse import as_unavailable

            plain = as_unavailable(exc)
            if plain is not None:
                raise plain from exc
            raise

    return wrapper


def _owners(ti_owner: str | None = None, run_owner: str | None = None) -> tuple[str, str]:
    """(task-instance owner, DAG-run owner) of the running task, unless both are given."""
    if ti_owner and run_owner:
        return ti_owner, run_owner
    from airflow.sdk import get_current_context

    from etl import claims

    ti = get_current_context()["ti"]
    return (ti_owner or claims.task_owner(ti.dag_id, ti.run_id, ti.task_id, ti.map_index),
            run_owner or claims.run_owner(ti.dag_id, ti.run_id))


@_plain_errors
def rupa_extract(stream: str, settings: Settings | None = None) -> dict:
    """Full sync of one Rupa stream (`patients` or `lab_tests`) into the warehouse."""
    from etl.extract.streams import extract_stream

    settings = settings or airflow_settings(require=("rupa",))
    summary = extract_stream(_engine(settings), settings, stream)
    return {**asdict(summary), "summary": summary.line()}


def rupa_intents(settings: Settings | None = None) -> list[dict]:
    """Send the order-intents files waiting in inbox/intents/ (one cart per row, checkout report)."""
    from etl.checkout.inbox import process_intents_inbox

    settings = settings or airflow_settings(require=("rupa",))
    from etl import audit

    ti, _ = _owners()  # a retry of this task instance takes its rows over at once
    engine = _engine(settings)
    outcomes = process_intents_inbox(engine, settings, owner=ti)
    for o in outcomes:
        audit.record_outcome_reports(engine, o)
    return outcomes


def rupa_events(settings: Settings | None = None) -> dict:
    """Apply stored Rupa events to the warehouse and download new results."""
    from etl import audit
    from etl.checkout.events import apply_events

    settings = settings or airflow_settings()
    engine, since = _engine(settings), datetime.now(UTC)
    summary = apply_events(engine, settings)
    audit.record_results(engine, since)
    return {**summary.as_dict(), "summary": summary.line()}


@_plain_errors
def inbox_prepare(settings: Settings | None = None, *, run_owner: str | None = None) -> dict:
    """Claim and validate new inbox files into the outbox; list the chunks to load (theirs and
    those of incomplete batches whose rows go out again)."""
    from etl.orders import inbox

    settings = settings or airflow_settings()
    _, run = _owners("-", run_owner) if run_owner else _owners()
    return inbox.prepare(_engine(settings), settings, owner=run)


@_plain_errors
def inbox_load_chunk(chunk: dict, settings: Settings | None = None, *, ti_owner: str | None = None,
                     run_owner: str | None = None) -> dict:
    """Load one chunk of outbox rows into LetsGetChecked (one mapped task per chunk)."""
    from etl.orders import inbox

    settings = settings or airflow_settings(require=("lgc",))
    ti, run = _owners(ti_owner, run_owner)
    return inbox.load_chunk(_engine(settings), settings, chunk, owner=ti, file_owner=run)


def chunk_label(chunk: dict) -> str:
    """How a load task is shown in the Airflow UI instead of "Map Index 3": the file and the
    lines its rows came from, e.g. `orders.csv lines 2-501 (500 rows)`. No PHI: names and counts."""
    name = str(chunk.get("file") or f"batch {chunk.get('batch_id')}").rsplit("/", 1)[-1]
    rows = int(chunk.get("rows") or 0)
    first, last = int(chunk.get("first_line") or 0), int(chunk.get("last_line") or 0)
    where = f"lines {first}-{last}" if first and last else f"outbox ids {chunk.get('first_id')}-{chunk.get('last_id')}"
    return f"{name} {where} ({rows} row{'s' if rows != 1 else ''})"


def summary_location(settings: Settings, outcome: dict) -> str | None:
    """Where a batch's summary page is: the inbox joined with the page's path inside it."""
    from pathlib import PurePosixPath

    from etl.intake.names import summary_path

    inside = outcome.get("summary") or (
        str(summary_path(PurePosixPath(outcome["file"]))) if outcome.get("file") else None)
    from etl.intake.storage import (
        display,  # a password in the inbox URL never reaches a log or XCom
    )

    return None if inside is None else f"{display(settings.inbox).rstrip('/')}/{inside}"


@_plain_errors
def inbox_finish(prepared: dict, settings: Settings | None = None, *, run_owner: str | None = None) -> list[dict]:
    """Statuses from the outbox, summaries beside each file, files moved to processed/. Each
    summary's location is written to the task log and returned (XCom) as `summary_location`."""
    from etl.orders import inbox

    settings = settings or airflow_settings()
    _, run = _owners("-", run_owner) if run_owner else _owners()
    outcomes = []
    for outcome in inbox.finish(_engine(settings), settings, prepared, owner=run):
        location = summary_location(settings, outcome)
        if location:
            log.info("summary of %s (%s): %s", outcome.get("name"), outcome.get("status"), location)
        outcomes.append({**outcome, "summary_location": location})
    return outcomes


def inbox_check(outcomes: list[dict]) -> dict:
    """Fail the run (red) when a batch ended incomplete or a file was unusable."""
    from etl.orders import inbox

    inbox.check(list(outcomes or []))
    return {"batches": len(outcomes or [])}


# ---- lgc_lifecycle: LetsGetChecked after the PUT (etl.orders.lifecycle, etl.orders.results) ----------

def _all_failed(failed: int, succeeded: int) -> bool:
    """A pass where nothing answered and something failed is a failed task (the vendor is down);
    a few failures among answers are counted and retried by the next run."""
    return failed > 0 and succeeded == 0


@_plain_errors
def lgc_apply_webhooks(settings: Settings | None = None) -> dict:
    """Apply stored LetsGetChecked webhook events; each order they name is confirmed by a GET."""
    from etl.errors import ApiError
    from etl.orders.lifecycle import apply_webhooks

    settings = settings or airflow_settings(require=("lgc",))
    summary = apply_webhooks(_engine(settings), settings)
    if _all_failed(summary.failed, summary.applied + summary.ignored):
        raise ApiError(f"no webhook event could be applied ({summary.failed} failed); they are retried next run")
    return {**summary.as_dict(), "summary": summary.line()}


@_plain_errors
def lgc_sweep(settings: Settings | None = None) -> dict:
    """GET the open orders not checked for `lifecycle.stale_after` (catches lost webhooks)."""
    from etl.errors import ApiError
    from etl.orders.lifecycle import track

    settings = settings or airflow_settings(require=("lgc",))
    summary = track(_engine(settings), settings, stale_after=settings.lifecycle.validated().stale_after)
    if _all_failed(len(summary.failed), summary.checked):
        raise ApiError(f"no order could be checked ({len(summary.failed)} failed)")
    return {**summary.as_dict(), "summary": summary.line()}


@_plain_errors
def lgc_fetch_results(settings: Settings | None = None) -> dict:
    """Fetch and store the results of items at ResultsAvailable (JSON + HL7), once each."""
    from etl import audit
    from etl.errors import ApiError
    from etl.orders.results import fetch_results

    settings = settings or airflow_settings(require=("lgc",))
    engine, since = _engine(settings), datetime.now(UTC)
    summary = fetch_results(engine, settings)
    audit.record_results(engine, since)
    if _all_failed(len(summary.failed), summary.stored + summary.hl7_added + summary.not_released):
        raise ApiError(f"no result could be fetched ({len(summary.failed)} failed)")
    return {**summary.as_dict(), "summary": summary.line(), "flagged": report_flagged(engine)}


@_plain_errors
def lgc_poll_letters(settings: Settings | None = None) -> dict:
    """Walk LetsGetChecked's results-letters feed and store each letter's PDF once (issue 25)."""
    from etl.orders.outreach import poll_feed

    settings = settings or airflow_settings(require=("lgc",))
    summary = poll_feed(_engine(settings), settings)
    return {**summary.as_dict(), "summary": summary.line()}


@_plain_errors
def program_pages(settings: Settings | None = None) -> dict:
    """Regenerate every program's page and CSVs in the inbox (etl.program.page)."""
    from etl.program import page

    settings = settings or airflow_settings()
    written = page.write(_engine(settings), settings)
    return {"programs": [w.as_dict() for w in written]}


LGC_RESULTS_ASSET = ("lgc_results", "labsync://warehouse/lgc_results")  # dags/lgc_lifecycle.py's LGC_RESULTS


def report_flagged(engine, outlet_events=None) -> int:
    """Lab observations (both vendors) flagged critical, or abnormal as LABSYNC_RESULTS_FLAG_LEVEL
    says, not reported yet: an event for whoever acts on them (the alerting work, a DAG scheduled
    on the asset), as the `flagged_observations` extra of this task's lgc_results asset event:
    ids, code and interpretation only, never a value or a patient. Each is reported once (marked
    in lab_observations.notified_at); outside a task (no outlet events) nothing is reported."""
    from etl.results import observations

    pending = observations.pending_events(engine, observations.levels_for())
    if not pending:
        return 0
    try:
        if outlet_events is None:
            from airflow.sdk import get_current_context

            outlet_events = get_current_context()["outlet_events"]
        from airflow.sdk import Asset

        name, uri = LGC_RESULTS_ASSET
        outlet_events[Asset(name=name, uri=uri)].extra["flagged_observations"] = [
            {"observation_id": p["id"], "vendor": p["vendor"], "order_id": p["order_id"], "item_id": p["item_id"],
             "code": p["code"], "code_system": p["code_system"], "interpretation": p["interpretation"],
             "status": p["status"]} for p in pending]
    except Exception as exc:  # not inside a task: left for the next task run
        log.info("lab observations: %d flagged not reported (%s)", len(pending), type(exc).__name__)
        return 0
    observations.mark_notified(engine, [p["id"] for p in pending])
    log.info("lab observations: %d flagged observations reported as an event", len(pending))
    return len(pending)


# ---- labsync_retention: the retention of each class of PHI (etl.retention) -----------------------

@_plain_errors
def retention_purge(settings: Settings | None = None) -> dict:
    """Purge what is older than its retention and no longer needed (one audit row per class
    purged); returns counts per class (no PHI)."""
    from etl.retention import purge

    settings = settings or airflow_settings()
    report = purge(_engine(settings), settings)
    return {**report.as_dict(), "summary": report.line()}
