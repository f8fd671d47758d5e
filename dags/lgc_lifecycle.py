"""LetsGetChecked after the PUT: item statuses, barcodes, tracking and results, every 15 minutes.

apply_webhooks: apply the events `labsync webhooks serve` stored (each order confirmed by a GET)
sweep:          GET open orders not checked for LABSYNC_TRACK_STALE_MINUTES (default 60): catches
                webhooks LetsGetChecked gave up on (it retries for about an hour) or never sent
fetch_results:  results JSON + HL7 of items at ResultsAvailable, stored once
poll_letters:   the results-letters feed (Outreach API): letters recorded, their PDFs stored once
program_pages:  every program's page and CSVs regenerated in the inbox (programs/<program>/)

Schedule: LABSYNC_LIFECYCLE_SCHEDULE (default every 15 minutes). Connection: lgc_default.
Timeout: LABSYNC_TASK_TIMEOUT_MINUTES per task (default 60).
Assets: lgc_order_items (apply_webhooks, sweep), lgc_results (fetch_results) and
lgc_outreach_letters (poll_letters). Every step is
idempotent, so a retried task is safe; sweep and fetch_results run even if an earlier step failed.
"""

from datetime import datetime, timedelta

from airflow.sdk import Asset, dag

from etl.airflow.dagkit import labsync_dag, task  # alerts, asset extras, metrics, lineage
from etl.settings import DagSettings

LGC_ORDER_ITEMS = Asset(name="lgc_order_items", uri="labsync://warehouse/lgc_order_items")
LGC_RESULTS = Asset(name="lgc_results", uri="labsync://warehouse/lgc_results")
LGC_OUTREACH_LETTERS = Asset(name="lgc_outreach_letters", uri="labsync://warehouse/lgc_outreach_letters")

DAG_SETTINGS = DagSettings.from_env()  # checked: a bad value names its setting
TASK_TIMEOUT = timedelta(minutes=DAG_SETTINGS.task_timeout_minutes)
RETRIES = {"retries": 2, "retry_delay": timedelta(minutes=1), "execution_timeout": TASK_TIMEOUT}


@dag(
    schedule=DAG_SETTINGS.lifecycle_schedule,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=RETRIES,
    tags=["labsync", "lgc"],
    doc_md=__doc__,
)
def lgc_lifecycle():
    @task(outlets=[LGC_ORDER_ITEMS])
    def apply_webhooks() -> dict:
        from etl.airflow.tasks import lgc_apply_webhooks

        return lgc_apply_webhooks()

    @task(outlets=[LGC_ORDER_ITEMS], trigger_rule="all_done")
    def sweep() -> dict:
        from etl.airflow.tasks import lgc_sweep

        return lgc_sweep()

    @task(outlets=[LGC_RESULTS], trigger_rule="all_done")
    def fetch_results() -> dict:
        from etl.airflow.tasks import lgc_fetch_results

        return lgc_fetch_results()

    @task(outlets=[LGC_OUTREACH_LETTERS], trigger_rule="all_done")
    def poll_letters() -> dict:
        from etl.airflow.tasks import lgc_poll_letters

        return lgc_poll_letters()

    @task(trigger_rule="all_done")
    def program_pages() -> dict:
        from etl.airflow.tasks import program_pages as write_pages

        return write_pages()

    apply_webhooks() >> sweep() >> fetch_results() >> poll_letters() >> program_pages()


labsync_dag(lgc_lifecycle())
