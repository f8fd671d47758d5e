"""Rupa Health -> warehouse: patients and lab tests, in parallel, on a schedule.

Schedule: LABSYNC_RUPA_SCHEDULE (cron or preset, default @hourly). Connection: rupa_default.
Timeout: LABSYNC_TASK_TIMEOUT_MINUTES per task (default 60).
Each task marks the Asset of the table it refreshed, so downstream DAGs can be asset-scheduled.
"""

from datetime import datetime, timedelta

from airflow.sdk import Asset, dag

from etl.airflow.dagkit import labsync_dag, task  # alerts, asset extras, metrics, lineage
from etl.settings import DagSettings

RUPA_PATIENTS = Asset(name="rupa_patients", uri="labsync://warehouse/rupa_patients")
RUPA_LAB_TESTS = Asset(name="rupa_lab_tests", uri="labsync://warehouse/rupa_lab_tests")

DAG_SETTINGS = DagSettings.from_env()  # checked: a bad value names its setting
TASK_TIMEOUT = timedelta(minutes=DAG_SETTINGS.task_timeout_minutes)
RETRIES = {"retries": 2, "retry_delay": timedelta(minutes=2), "execution_timeout": TASK_TIMEOUT}


@dag(
    schedule=DAG_SETTINGS.rupa_schedule,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=RETRIES,
    tags=["labsync", "rupa"],
    doc_md=__doc__,
)
def rupa_extract():
    @task(outlets=[RUPA_PATIENTS])
    def extract_patients() -> dict:
        from etl.airflow.tasks import rupa_extract as run

        return run("patients")

    @task(outlets=[RUPA_LAB_TESTS])
    def extract_lab_tests() -> dict:
        from etl.airflow.tasks import rupa_extract as run

        return run("lab_tests")

    extract_patients()
    extract_lab_tests()


labsync_dag(rupa_extract())
