"""What every labsync DAG gets without anyone editing a DAG file: read when Airflow parses the DAG
files, so it imports Airflow's decorator machinery and the standard library only; the work is
imported when a task or a callback runs.

    task            `@task` whose operator also
                    - marks its outlets' asset events with what happened (batch id, rows
                      accepted/rejected/failed, orders checked, results stored: counts only),
                    - reports counters and timings through Airflow's metrics (StatsD/OpenTelemetry,
                      as the deployment configures them): etl.airflow.observe,
                    - reports its inputs and outputs to OpenLineage itself (the inbox file by its
                      URL, the vendor API, the warehouse tables in the warehouse's namespace):
                      `get_openlineage_facets_on_complete`, the provider's extractor interface
    labsync_dag(d)  the DAG-level on_failure_callback / on_success_callback that send labsync's
                    alerts (etl.alerts: a failed run, and whatever the warehouse shows), and an
                    Airflow Deadline Alert when LABSYNC_RUN_DEADLINE_MINUTES is set
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from airflow.providers.standard.decorators.python import _PythonDecoratedOperator
from airflow.sdk.bases.decorator import task_decorator_factory

from etl.settings import DagSettings

log = logging.getLogger(__name__)


class LabsyncTaskOperator(_PythonDecoratedOperator):
    """A TaskFlow task that reports what it did (asset extras, metrics, lineage)."""

    custom_operator_name = "@task"

    def execute(self, context: Any) -> Any:
        started = time.monotonic()
        result = super().execute(context)
        try:
            from etl.airflow.observe import after_task

            after_task(self, context, result, time.monotonic() - started)
        except Exception as exc:  # reporting never fails a task that did its work
            log.warning("labsync: could not report what %s did (%s)", self.task_id, type(exc).__name__)
        return result

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        from etl.airflow.lineage import facets_on_complete

        return facets_on_complete(self, task_instance)


def task(python_callable=None, multiple_outputs: bool | None = None, **kwargs):
    """`@task` / `@task(...)` as airflow.sdk's, with LabsyncTaskOperator."""
    return task_decorator_factory(python_callable=python_callable, multiple_outputs=multiple_outputs,
                                  decorated_operator_class=LabsyncTaskOperator, **kwargs)


def on_dag_failure(context: Any) -> None:
    from etl.airflow.alerting import dag_run_ended

    dag_run_ended(context, failed=True)


def on_dag_success(context: Any) -> None:
    from etl.airflow.alerting import dag_run_ended

    dag_run_ended(context, failed=False)


def _add(existing: Any, callback: Any) -> list:
    found = [] if existing is None else list(existing) if isinstance(existing, list) else [existing]
    return found if callback in found else [*found, callback]


def labsync_dag(dag: Any, settings: DagSettings | None = None) -> Any:
    """The DAG with labsync's alert callbacks (kept beside any the DAG already has) and, when
    LABSYNC_RUN_DEADLINE_MINUTES is set, a Deadline Alert on its runs."""
    settings = settings or DagSettings.from_env()
    dag.on_failure_callback = _add(dag.on_failure_callback, on_dag_failure)
    dag.on_success_callback = _add(dag.on_success_callback, on_dag_success)
    dag.has_on_failure_callback = dag.has_on_success_callback = True
    if settings.run_deadline_minutes > 0:
        try:  # Deadline Alerts (Airflow >= 3.1, the lowest labsync supports)
            from airflow.sdk.definitions.callback import AsyncCallback
            from airflow.sdk.definitions.deadline import DeadlineAlert, DeadlineReference
        except ImportError:  # pragma: no cover
            log.warning("labsync: this Airflow has no Deadline Alerts; LABSYNC_RUN_DEADLINE_MINUTES ignored")
        else:
            alert = DeadlineAlert(reference=DeadlineReference.DAGRUN_QUEUED_AT,
                                  interval=timedelta(minutes=settings.run_deadline_minutes),
                                  callback=AsyncCallback("etl.airflow.alerting.deadline_missed",
                                                         kwargs={"dag_id": dag.dag_id}))
            dag.deadline = [*(dag.deadline or []), alert]
    return dag
