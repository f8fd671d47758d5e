"""Airflow's `[core] hostname_callable` for the e2e cluster's Celery workers.

Both workers run on this one machine, so Airflow's default (the FQDN) would record the same
hostname for every task instance. Each worker stands for a separate machine: it gets
LABSYNC_E2E_WORKER (worker1, worker2) in its environment, and its task instances record
`worker1@<host>`, the same name as its `--celery-hostname worker1@%h`."""

from __future__ import annotations

import os
import socket


def worker_hostname() -> str:
    name = os.environ.get("LABSYNC_E2E_WORKER")
    host = socket.gethostname()
    return f"{name}@{host}" if name else host
