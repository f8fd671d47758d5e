"""After a labsync task did its work (etl.airflow.dagkit.LabsyncTaskOperator): its asset events'
extras, its metrics, and what OpenLineage is told (etl.airflow.lineage). Everything here comes
from the task's return value (PHI-free by contract: etl.airflow.tasks) and from counts.

Metrics, through Airflow's Stats (StatsD or OpenTelemetry, as [metrics] configures them; nothing
is sent when metrics are off). Names (counters unless marked):

    labsync.task.<task_id>.duration          timer, every task
    labsync.orders.sent                      rows PUT to LetsGetChecked (load)
    labsync.orders.outcome.<outcome>         rows by outcome: accepted, rejected, conflict, failed, given_up, ...
    labsync.lgc.requests / labsync.lgc.retries   HTTP PUTs made, and those beyond one per row sent
    labsync.lgc.load_duration                timer, one load task's time talking to LetsGetChecked
    labsync.lgc.request_latency              timer, a load's average time per request (elapsed x concurrency / requests)
    labsync.lgc.breaker_trips / labsync.lgc.credentials_refused   loads stopped early, by why
    labsync.webhooks.applied / .ignored / .failed                 events applied by apply_webhooks
    labsync.webhooks.age_when_applied        timer, per event: received -> applied
    labsync.lifecycle.orders_checked / .check_failures            the sweep
    labsync.results.stored / .fetch_failures                      fetch_results
    labsync.intake.files.<status>            files prepared, by status (validated, unusable, duplicate)
    labsync.intake.rows_validated            rows validated (prepare)
    labsync.intake.rows_per_second           gauge, rows validated per second of prepare
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

log = logging.getLogger(__name__)

# per task: the numbers of its return value that go into its asset events' extra
EXTRA_KEYS = {
    "load": ("batch_id", "rows", "sent", "skipped"),
    "apply_webhooks": ("events", "applied", "ignored", "failed", "confirmed"),
    "sweep": ("orders", "checked", "changed", "failed"),
    "fetch_results": ("candidates", "stored", "hl7_added", "not_released", "failed"),
}


def stats():
    """Airflow's Stats (its location moved in 3.2)."""
    try:
        from airflow.sdk.observability.stats import Stats
    except ImportError:  # Airflow 3.1
        from airflow.stats import Stats
    return Stats


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def asset_extra(task_id: str, result: Any) -> dict:
    """What happened, for the asset events: counts and the batch id only."""
    if not isinstance(result, dict):
        return {}
    keys = EXTRA_KEYS.get(task_id)
    extra = {k: result[k] for k in (keys or result) if _int(result.get(k)) is not None}
    for k, v in (result.get("counts") or {}).items():  # load: rows by outcome
        if _int(v) is not None:
            extra[str(k)] = v
    return extra


def after_task(op: Any, context: Any, result: Any, seconds: float) -> None:
    task_id = op.task_id
    extra = asset_extra(task_id, result)
    outlet_events = context.get("outlet_events") if hasattr(context, "get") else None
    if extra and outlet_events is not None:
        for outlet in getattr(op, "outlets", None) or []:
            try:
                outlet_events[outlet].extra.update(extra)
            except Exception as exc:  # an outlet that is not an Asset
                log.debug("no asset event extra for %r (%s)", outlet, type(exc).__name__)
    emit_metrics(task_id, result, seconds)
    try:
        import importlib.util

        if importlib.util.find_spec("airflow.providers.openlineage") is not None:
            from etl.airflow.lineage import remember

            remember(op, result)
    except Exception as exc:
        log.debug("lineage not recorded (%s)", type(exc).__name__)


def emit_metrics(task_id: str, result: Any, seconds: float, since: datetime | None = None) -> None:
    s = stats()
    s.timing(f"labsync.task.{task_id}.duration", timedelta(seconds=seconds))
    if not isinstance(result, dict | list):
        return
    if task_id == "load" and isinstance(result, dict):
        for outcome, n in (result.get("counts") or {}).items():
            if n:
                s.incr(f"labsync.orders.outcome.{outcome}", n)
        sent, requests = result.get("sent") or 0, result.get("requests") or 0
        if sent:
            s.incr("labsync.orders.sent", sent)
        if requests:
            s.incr("labsync.lgc.requests", requests)
            if requests > sent:
                s.incr("labsync.lgc.retries", requests - sent)
            elapsed = float(result.get("elapsed") or 0)
            s.timing("labsync.lgc.load_duration", timedelta(seconds=elapsed))
            s.timing("labsync.lgc.request_latency", timedelta(seconds=elapsed / requests))
        stopped = str(result.get("stopped") or "")
        if result.get("exit_code") == 2 or "refused the credentials" in stopped:
            s.incr("labsync.lgc.credentials_refused")
        elif "in a row" in stopped or "deadline" in stopped:
            s.incr("labsync.lgc.breaker_trips")
    elif task_id == "apply_webhooks" and isinstance(result, dict):
        for k in ("applied", "ignored", "failed"):
            if result.get(k):
                s.incr(f"labsync.webhooks.{k}", result[k])
        if result.get("applied"):
            for age in webhook_ages(since or datetime.now(UTC) - timedelta(seconds=seconds + 1)):
                s.timing("labsync.webhooks.age_when_applied", age)
    elif task_id == "sweep" and isinstance(result, dict):
        if result.get("checked"):
            s.incr("labsync.lifecycle.orders_checked", result["checked"])
        if result.get("failed"):
            s.incr("labsync.lifecycle.check_failures", result["failed"])
    elif task_id == "fetch_results" and isinstance(result, dict):
        if result.get("stored"):
            s.incr("labsync.results.stored", result["stored"])
        if result.get("failed"):
            s.incr("labsync.results.fetch_failures", result["failed"])
    elif task_id == "prepare" and isinstance(result, dict):
        rows = 0
        for batch in result.get("batches") or []:
            s.incr(f"labsync.intake.files.{batch.get('status') or 'unknown'}")
            rows += _int(batch.get("total_rows")) or 0
        if rows:
            s.incr("labsync.intake.rows_validated", rows)
            s.gauge("labsync.intake.rows_per_second", rows / max(seconds, 1e-6))


def webhook_ages(since: datetime) -> list[timedelta]:
    """received -> applied of the events applied since `since` (ages only, no ids)."""
    import sqlalchemy as sa

    from etl import warehouse
    from etl.airflow.tasks import airflow_settings
    from etl.warehouse.tables import webhook_events as w

    engine = warehouse.connect(airflow_settings().warehouse_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(w.c.received_at, w.c.applied_at).where(
            w.c.applied_at.is_not(None), w.c.applied_at >= since).limit(10_000)).all()
    out = []
    for received, applied in rows:
        received = received if received.tzinfo else received.replace(tzinfo=UTC)
        applied = applied if applied.tzinfo else applied.replace(tzinfo=UTC)
        out.append(max(applied - received, timedelta(0)))
    return out
