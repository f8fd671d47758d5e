"""CSV inbox -> validation -> LetsGetChecked, every few minutes.

prepare: claim new files in LABSYNC_INBOX (by content hash: a re-dropped copy is recognised),
         validate them, write FILE.rejects.csv, stage valid rows in chunks (LABSYNC_CHUNK_ROWS)
load:    one mapped task per chunk (dynamic task mapping), idempotent PUTs via the ledger
finish:  FILE.summary.html beside each file, file moved to processed/ (or failed/)

Schedule: LABSYNC_INBOX_SCHEDULE (default every 5 minutes). Connection: lgc_default.
A load task that fails half-way is retried by Airflow; the ledger makes the re-send safe.
"""

import os
from datetime import datetime, timedelta

from airflow.sdk import dag, task

RETRIES = {"retries": 2, "retry_delay": timedelta(minutes=1)}


@dag(
    schedule=os.environ.get("LABSYNC_INBOX_SCHEDULE", "*/5 * * * *"),
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
        from etl.tasks import inbox_prepare

        return inbox_prepare()

    @task
    def chunks(prepared: dict) -> list:
        return prepared["chunks"]  # the list `load` is mapped over (one task per chunk)

    @task(max_active_tis_per_dagrun=int(os.environ.get("LABSYNC_LOAD_PARALLELISM", "4")))
    def load(chunk: dict) -> dict:
        from etl.tasks import inbox_load_chunk

        return inbox_load_chunk(chunk)

    @task(trigger_rule="all_done")
    def finish(prepared: dict, results: list) -> list:
        from etl.tasks import inbox_finish

        return inbox_finish(prepared, list(results))

    prepared = prepare()
    loaded = load.expand(chunk=chunks(prepared))
    finish(prepared, loaded)


order_batches()
