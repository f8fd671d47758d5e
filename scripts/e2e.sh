#!/usr/bin/env bash
# `make e2e`: labsync on a real Airflow CeleryExecutor cluster, started here from nothing
# (tests/e2e/cluster.py): PostgreSQL, redis-server, the sandbox APIs, Airflow's api-server,
# dag-processor, scheduler and two Celery workers, each in its own directory/HOME/TMPDIR.
# The scheduler runs order_batches over three example files, then over a bigger batch during
# which one worker is SIGKILLed mid-load (tests/e2e/test_cluster.py). The last line says which
# load tasks each worker ran. Every component's log stays in .labsync/e2e/<name>/<name>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-postgres.sh
if ! command -v redis-server >/dev/null 2>&1; then
  echo "labsync: installing the Redis server (Debian package 'redis-server') for the Celery broker"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq redis-server >/dev/null
  command -v redis-server >/dev/null
fi
summary=.labsync/e2e-summary.txt
rm -f "$summary"
start=$(date +%s)
# shellcheck disable=SC2086  # E2E_PYTEST_ARGS: extra pytest arguments, split on purpose
LABSYNC_E2E=1 .venv/bin/pytest tests/e2e -p no:cacheprovider -p no:xdist -x -q -s ${E2E_PYTEST_ARGS:-}
echo "e2e: $(( $(date +%s) - start ))s"
cat "$summary"
