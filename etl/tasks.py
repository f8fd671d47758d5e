"""The functions the Airflow DAGs call, one per task. Each reads its settings from Airflow
Connections (falling back to the environment), does one thing in `etl/`, and returns a small,
JSON-safe, PHI-free dict for XCom. Nothing here imports Airflow at module level."""

from __future__ import annotations

from dataclasses import asdict

from etl.settings import Settings


def _engine(settings: Settings):
    from etl import warehouse

    return warehouse.connect(settings.warehouse_url)


def rupa_extract(stream: str, settings: Settings | None = None) -> dict:
    """Full sync of one Rupa stream (`patients` or `lab_tests`) into the warehouse."""
    from etl.rupa.extract import extract_stream

    settings = settings or Settings.from_airflow()
    summary = extract_stream(_engine(settings), settings, stream)
    return {**asdict(summary), "summary": summary.line()}


def inbox_prepare(settings: Settings | None = None) -> dict:
    """Claim and validate new inbox files; stage their valid rows in chunks."""
    from etl.batches import inbox

    settings = settings or Settings.from_airflow()
    return inbox.prepare(_engine(settings), settings)


def inbox_load_chunk(chunk: dict, settings: Settings | None = None) -> dict:
    """Load one staged chunk into LetsGetChecked (one mapped task per chunk)."""
    from etl.batches import inbox

    settings = settings or Settings.from_airflow()
    return inbox.load_chunk(_engine(settings), settings, chunk)


def inbox_finish(prepared: dict, results: list, settings: Settings | None = None) -> list[dict]:
    """Summaries beside each file, files moved to processed/ or failed/."""
    from etl.batches import inbox

    settings = settings or Settings.from_airflow()
    return inbox.finish(_engine(settings), settings, prepared, [r for r in results if r])


# ---- lgc_lifecycle: LetsGetChecked after the PUT (etl.lgc.lifecycle, etl.lgc.results) ----------

def _all_failed(failed: int, succeeded: int) -> bool:
    """A pass where nothing answered and something failed is a failed task (the vendor is down);
    a few failures among answers are counted and retried by the next run."""
    return failed > 0 and succeeded == 0


def lgc_apply_webhooks(settings: Settings | None = None) -> dict:
    """Apply stored LetsGetChecked webhook events; each order they name is confirmed by a GET."""
    from etl.errors import ApiError
    from etl.lgc.lifecycle import apply_webhooks

    settings = settings or Settings.from_airflow()
    summary = apply_webhooks(_engine(settings), settings)
    if _all_failed(summary.failed, summary.applied + summary.ignored):
        raise ApiError(f"no webhook event could be applied ({summary.failed} failed); they are retried next run")
    return {**summary.as_dict(), "summary": summary.line()}


def lgc_sweep(settings: Settings | None = None) -> dict:
    """GET the open orders not checked for `lifecycle.stale_after` (catches lost webhooks)."""
    from etl.errors import ApiError
    from etl.lgc.lifecycle import track

    settings = settings or Settings.from_airflow()
    summary = track(_engine(settings), settings, stale_after=settings.lifecycle.validated().stale_after)
    if _all_failed(len(summary.failed), summary.checked):
        raise ApiError(f"no order could be checked ({len(summary.failed)} failed)")
    return {**summary.as_dict(), "summary": summary.line()}


def lgc_fetch_results(settings: Settings | None = None) -> dict:
    """Fetch and store the results of items at ResultsAvailable (JSON + HL7), once each."""
    from etl.errors import ApiError
    from etl.lgc.results import fetch_results

    settings = settings or Settings.from_airflow()
    summary = fetch_results(_engine(settings), settings)
    if _all_failed(len(summary.failed), summary.stored + summary.hl7_added + summary.not_released):
        raise ApiError(f"no result could be fetched ({len(summary.failed)} failed)")
    return {**summary.as_dict(), "summary": summary.line()}
