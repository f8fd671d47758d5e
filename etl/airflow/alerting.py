"""The DAG callbacks' work (etl.airflow.dagkit): a run that ended, a run past its deadline.

A failed run opens `dag_failed:<dag>` (repeat failures fold into it until a run succeeds, which
resolves it); every run that ends also evaluates the warehouse's conditions, so what the run left
behind (an unusable file, rows given up, a tripped breaker) is sent at once. A callback never
raises: an alert that cannot be sent is logged and retried by the next evaluation.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

log = logging.getLogger(__name__)


def run_link(dag_id: str, run_id: str | None, base_url: str | None = None) -> str | None:
    """The run's page in the Airflow UI (LABSYNC_AIRFLOW_URL, else Airflow's [api] base_url)."""
    if not base_url:
        try:
            from airflow.configuration import conf

            base_url = conf.get("api", "base_url", fallback=None)
        except Exception:
            base_url = None
    if not base_url:
        return None
    link = f"{base_url.rstrip('/')}/dags/{quote(dag_id, safe='')}"
    return link + (f"/runs/{quote(run_id, safe='')}" if run_id else "")


def _ids(context: Any) -> tuple[str, str | None]:
    dag = context.get("dag")
    dag_run = context.get("dag_run")
    dag_id = getattr(dag, "dag_id", None) or getattr(dag_run, "dag_id", None) or "unknown DAG"
    run_id = context.get("run_id") or getattr(dag_run, "run_id", None)
    return dag_id, run_id


def dag_run_ended(context: Any, *, failed: bool) -> None:
    try:
        _dag_run_ended(context, failed)
    except Exception:
        log.exception("labsync alerts: could not evaluate the alerts after this run")


def _dag_run_ended(context: Any, failed: bool) -> None:
    from etl import alerts, warehouse
    from etl.airflow.tasks import airflow_settings

    settings = airflow_settings()
    dag_id, run_id = _ids(context)
    link = run_link(dag_id, run_id, settings.alerts.airflow_url)
    engine = warehouse.connect(settings.warehouse_url)
    if failed:
        ti = context.get("ti") or context.get("task_instance")
        task_id = getattr(ti, "task_id", None)
        event = alerts.Condition(
            f"dag_failed:{dag_id}", f"{dag_id} run failed",
            f"Run {run_id}" + (f" failed at task {task_id}" if task_id else " failed")
            + ". Later failures fold into this alert until a run succeeds.",
            link, {"run_id": run_id})
        report = alerts.evaluate(engine, settings, events=[event])
    else:
        report = alerts.evaluate(engine, settings, resolve=[f"dag_failed:{dag_id}"])
    log.info("labsync %s", report.line())


async def deadline_missed(dag_id: str, context: Any = None, **_: Any) -> None:
    """Airflow's Deadline Alert callback (runs in the triggerer): the run is still going past
    LABSYNC_RUN_DEADLINE_MINUTES after it was queued."""
    import asyncio

    await asyncio.to_thread(_deadline_missed, dag_id, context or {})


def _deadline_missed(dag_id: str, context: Any) -> None:
    try:
        from etl import alerts, warehouse
        from etl.airflow.tasks import airflow_settings
        from etl.settings import DagSettings

        settings = airflow_settings()
        run_id = None
        if isinstance(context, dict):
            run = context.get("dag_run")
            run_id = (run.get("run_id") if isinstance(run, dict) else getattr(run, "run_id", None)) or context.get("run_id")
        minutes = DagSettings.from_env().run_deadline_minutes
        event = alerts.Condition(
            f"deadline_missed:{dag_id}:{run_id}", f"{dag_id} run past its deadline",
            f"Run {run_id} was still going {minutes:g} minutes after it was queued.",
            run_link(dag_id, run_id, settings.alerts.airflow_url), {"run_id": run_id})
        alerts.evaluate(warehouse.connect(settings.warehouse_url), settings, events=[event], scan_warehouse=False)
    except Exception:
        log.exception("labsync alerts: could not send the deadline alert of %s", dag_id)
