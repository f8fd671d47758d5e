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


def rupa_intents(settings: Settings | None = None) -> list[dict]:
    """Send the order-intents files waiting in inbox/intents/ (one cart per row, checkout report)."""
    from etl import logs

    logs.configure()  # httpx logs request URLs at INFO: result links must not reach the task log
    from etl.rupa.intents_inbox import process_intents_inbox

    settings = settings or Settings.from_airflow()
    return process_intents_inbox(_engine(settings), settings)


def rupa_events(settings: Settings | None = None) -> dict:
    """Apply stored Rupa events to the warehouse and download new results."""
    from etl import logs

    logs.configure()  # httpx logs request URLs at INFO: result links must not reach the task log
    from etl.rupa.events import apply_events

    settings = settings or Settings.from_airflow()
    summary = apply_events(_engine(settings), settings)
    return {**summary.as_dict(), "summary": summary.line()}


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
