"""`make e2e` only: these tests start a whole Airflow cluster (minutes, several servers), so the
ordinary suite (`make test`) does not collect them. scripts/e2e.sh sets LABSYNC_E2E=1."""

import os

if not os.environ.get("LABSYNC_E2E"):
    collect_ignore_glob = ["test_*.py"]
