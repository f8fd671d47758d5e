"""Retention: once a day, purge what is older than its retention and no longer needed.

purge: raw webhook bodies of applied events, result documents, rejected values, settled outbox
       bodies, batch files and their reports in the inbox's processed/ and failed/ (local or object
       storage), and the audit trail itself; one audit row per class purged (etl.retention).

Settings: LABSYNC_RETENTION_<CLASS>_DAYS (WEBHOOK_BODIES 30, RESULT_DOCUMENTS 365,
REJECTED_VALUES 90, OUTBOX_BODIES 30, BATCH_FILES 90, AUDIT 2192). Schedule:
LABSYNC_RETENTION_SCHEDULE (default @daily). Timeout: LABSYNC_TASK_TIMEOUT_MINUTES (default 60).
Purging twice is harmless, so a retried task is safe.
"""

from datetime import datetime, timedelta

from airflow.sdk import dag

from etl.airflow.dagkit import labsync_dag, task  # alerts, asset extras, metrics, lineage
from etl.settings import DagSettings

DAG_SETTINGS = DagSettings.from_env()  # checked: a bad value names its setting
TASK_TIMEOUT = timedelta(minutes=DAG_SETTINGS.task_timeout_minutes)
RETRIES = {"retries": 2, "retry_delay": timedelta(minutes=5), "execution_timeout": TASK_TIMEOUT}


@dag(
    schedule=DAG_SETTINGS.retention_schedule,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=RETRIES,
    tags=["labsync", "retention"],
    doc_md=__doc__,
)
def labsync_retention():
    @task
    def purge() -> dict:
        from etl.airflow.tasks import retention_purge

        return retention_purge()

    purge()


labsync_dag(labsync_retention())
