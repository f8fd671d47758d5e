"""Rupa Checkout: order-intent files in, Rupa's order events and results applied, on a schedule.

intents:      every CSV in LABSYNC_INBOX/intents/ -> one order intent (cart) per row at Rupa,
              FILE.summary.html with each patient's checkout link + FILE.checkout.csv, file moved
              to intents/processed/ (or intents/failed/ when unusable)
rupa_events:  events stored by the webhook receiver -> rupa_orders, rupa_ordered_tests,
              rupa_patients, rupa_lab_tests; result files downloaded into rupa_results

Schedule: LABSYNC_RUPA_CHECKOUT_SCHEDULE (default every 5 minutes). Connection: rupa_default.
Timeout: LABSYNC_TASK_TIMEOUT_MINUTES per task (default 60).
Both tasks are safe to retry: the intents ledger never sends a row twice on purpose, and events
apply idempotently in any order.
"""

from datetime import datetime, timedelta

from airflow.sdk import dag

from etl.airflow.dagkit import labsync_dag, task  # alerts, asset extras, metrics, lineage
from etl.settings import DagSettings

DAG_SETTINGS = DagSettings.from_env()  # checked: a bad value names its setting
TASK_TIMEOUT = timedelta(minutes=DAG_SETTINGS.task_timeout_minutes)
RETRIES = {"retries": 2, "retry_delay": timedelta(minutes=1), "execution_timeout": TASK_TIMEOUT}


@dag(
    schedule=DAG_SETTINGS.rupa_checkout_schedule,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=RETRIES,
    tags=["labsync", "rupa"],
    doc_md=__doc__,
)
def rupa_checkout():
    @task
    def intents() -> list:
        from etl.airflow.tasks import rupa_intents

        return rupa_intents()

    @task
    def rupa_events() -> dict:
        from etl.airflow.tasks import rupa_events as run

        return run()

    intents()
    rupa_events()


labsync_dag(rupa_checkout())
