"""CSV inbox -> validation -> outbox -> LetsGetChecked, every few minutes.

prepare: claim the files in LABSYNC_INBOX in the warehouse (by content hash: a re-dropped copy
         is recognised), validate each whole file, write its rows' PUT bodies to the outbox;
         list the chunks to load: id ranges of the outbox (LABSYNC_CHUNK_ROWS rows each),
         including rows of earlier incomplete batches that go out again
load:    one mapped task per chunk, in pool LABSYNC_LGC_POOL (default `lgc_api`, sized with
         `labsync budget --pool-slots`), shown as e.g. "orders.csv lines 2-501 (500 rows)"; claims
         owned by the task instance, idempotent PUTs recorded in the ledger and the outbox; marks
         the Asset `lgc_orders` (the ledger) so downstream DAGs can be asset-scheduled
finish:  runs even when a load failed: batch statuses from the outbox, FILE.summary.html beside
         each file, files moved to processed/; each summary's location is in its log and XCom
check:   fails the run (red) when a batch ended incomplete, a file was unusable, or a load task
         failed for good; the next run sends the rows again and is green once they go through

Schedule: LABSYNC_INBOX_SCHEDULE (default every 5 minutes). Connection: lgc_default (type
labsync-lgc). Timeouts: LABSYNC_LOAD_TIMEOUT_MINUTES for a load task (default 30: above
LGC_LOAD_DEADLINE's 15, after which a load stops sending), LABSYNC_TASK_TIMEOUT_MINUTES for the
others (default 60).
LABSYNC_INBOX: a folder or an fsspec URL (s3://bucket/prefix, ...), with credentials from the
environment or an Airflow Connection (`s3://conn_id@bucket/prefix`, or LABSYNC_INBOX_CONN_ID).
A load task that fails half-way is retried by Airflow; the ledger makes the re-send safe.
Alerts: a failed run, and whatever needs a person, go to LABSYNC_ALERTS (etl.alerts; see the README).
"""

from datetime import datetime, timedelta

from airflow.sdk import Asset, dag

from etl.airflow.dagkit import labsync_dag, task  # alerts, asset extras, metrics, lineage
from etl.settings import DagSettings

LGC_ORDERS = Asset(name="lgc_orders", uri="labsync://warehouse/lgc_orders")

DAG_SETTINGS = DagSettings.from_env()  # checked: a bad value names its setting
POOL = DAG_SETTINGS.lgc_pool
TASK_TIMEOUT = timedelta(minutes=DAG_SETTINGS.task_timeout_minutes)
LOAD_TIMEOUT = timedelta(minutes=DAG_SETTINGS.load_timeout_minutes)
RETRIES = {"retries": 2, "retry_delay": timedelta(minutes=1), "execution_timeout": TASK_TIMEOUT}


@dag(
    schedule=DAG_SETTINGS.inbox_schedule,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=RETRIES,
    tags=["labsync", "lgc"],
    doc_md=__doc__,
)
def order_batches():
    @task
    def prepare() -> dict:
        from etl.airflow.tasks import inbox_prepare

        return inbox_prepare()

    @task
    def chunks(prepared: dict) -> list:
        return prepared["chunks"]  # the list `load` is mapped over (one task per chunk)

    @task(pool=POOL, max_active_tis_per_dagrun=DAG_SETTINGS.load_parallelism,
          execution_timeout=LOAD_TIMEOUT, outlets=[LGC_ORDERS], map_index_template="{{ chunk_label }}")
    def load(chunk: dict) -> dict:
        from airflow.sdk import get_current_context

        from etl.airflow.tasks import chunk_label, inbox_load_chunk

        # the UI's name for this task; Airflow documents extra context keys for
        # map_index_template, but its Context TypedDict does not declare them
        get_current_context()["chunk_label"] = chunk_label(chunk)  # type: ignore[typeddict-unknown-key]
        return inbox_load_chunk(chunk)

    @task(trigger_rule="all_done")
    def finish(prepared: dict) -> list:
        from etl.airflow.tasks import inbox_finish

        return inbox_finish(prepared)

    @task(trigger_rule="none_failed", retries=0)
    def check(outcomes: list) -> dict:
        from etl.airflow.tasks import inbox_check

        return inbox_check(outcomes)

    prepared = prepare()
    loaded = load.expand(chunk=chunks(prepared))
    finished = finish(prepared)
    loaded >> finished
    loaded >> check(finished)


labsync_dag(order_batches())
