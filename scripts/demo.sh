#!/usr/bin/env bash
# `make demo`: the main job on embedded defaults.
# Starts the local sandbox APIs, prepares a throwaway AIRFLOW_HOME (SQLite metadata DB), runs the
# rupa_extract DAG and then the order_batches DAG over the example batches placed in the inbox,
# and prints where the ledger, the reject reports and the summaries are.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
bin=$repo/.venv/bin
demo=$repo/.labsync/demo
rm -rf "$demo"
mkdir -p "$demo/logs" "$demo/inbox"

port=${LABSYNC_SANDBOX_PORT:-8765}
if "$bin/python" -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', $port)) != 0)"; then
  port=$("$bin/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
fi

export LABSYNC_WAREHOUSE_URL="sqlite:///$demo/labsync.db"
export LABSYNC_INBOX="$demo/inbox"
export LABSYNC_INBOX_SETTLE_SECONDS=0
export LGC_BASE_URL="http://127.0.0.1:$port/lgc"
export RUPA_BASE_URL="http://127.0.0.1:$port/rupa"
export RUPA_REDIRECT_URI="http://127.0.0.1:$port/oauth/callback"
export AIRFLOW_HOME="$demo/airflow"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_FOLDER="$repo/dags"
export AIRFLOW__LOGGING__LOGGING_LEVEL=WARNING
unset RUPA_API_TOKEN LGC_API_TOKEN

step() { printf '\n== %s\n' "$*"; }

step "starting the sandbox APIs on 127.0.0.1:$port (LetsGetChecked at /lgc, Rupa at /rupa)"
"$bin/labsync" sandbox --port "$port" --patients 250 --lab-tests 40 > "$demo/logs/sandbox.log" 2>&1 &
sandbox_pid=$!
trap 'kill $sandbox_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$port/_sandbox/health" >/dev/null 2>&1 && break
  kill -0 $sandbox_pid 2>/dev/null || { cat "$demo/logs/sandbox.log"; exit 1; }
  sleep 0.2
done

step "warehouse: $LABSYNC_WAREHOUSE_URL"
"$bin/labsync" db upgrade

step "authorizing labsync with the Rupa sandbox (the practitioner's one-time consent)"
redirect=$("$bin/python" - <<PY
import httpx
from etl.settings import Settings
r = Settings.from_env().rupa.validated()
resp = httpx.get(f"{r.authorize_url}", params={"client_id": r.client_id, "redirect_uri": r.redirect_uri, "response_type": "code"})
print(resp.headers["location"])
PY
)
"$bin/labsync" rupa authorize --code "$redirect"

step "preparing a throwaway Airflow home in $AIRFLOW_HOME"
"$bin/airflow" db migrate > "$demo/logs/airflow-db.log" 2>&1
# the pool the order_batches load tasks run in (LABSYNC_LGC_POOL), sized from the vendor budget
# (`labsync budget --pool-slots`: one load task per two requests in flight); the budget in the
# warehouse is what bounds LetsGetChecked, the pool keeps workers from waiting idle for it
"$bin/airflow" pools set "${LABSYNC_LGC_POOL:-lgc_api}" "$("$bin/labsync" budget --pool-slots)" "LetsGetChecked API slots" \
  > "$demo/logs/airflow-pool.log" 2>&1
"$bin/airflow" pools get "${LABSYNC_LGC_POOL:-lgc_api}" 2>/dev/null | sed 's/^/  /'
"$bin/airflow" dags reserialize > "$demo/logs/airflow-reserialize.log" 2>&1

step "DAG rupa_extract (patients and lab tests in parallel)"
"$bin/airflow" dags test rupa_extract > "$demo/logs/rupa_extract.log" 2>&1 || { tail -40 "$demo/logs/rupa_extract.log"; exit 1; }
"$bin/python" - <<'PY'
import sqlalchemy as sa
from etl import warehouse
from etl.settings import Settings
engine = warehouse.connect(Settings.from_env().warehouse_url)
with engine.connect() as c:
    for row in c.execute(sa.text("select stream, status, inserted, updated, unchanged, deleted from sync_state order by stream")):
        print(f"  {row.stream}: {row.status}, {row.inserted} inserted, {row.updated} updated, {row.unchanged} unchanged, {row.deleted} deleted")
PY

step "DAG order_batches over the example batches"
cp examples/orders.csv "$LABSYNC_INBOX/orders.csv"
cp examples/orders_broken.csv "$LABSYNC_INBOX/orders_broken.csv"
cp examples/orders_unusable.csv "$LABSYNC_INBOX/orders_unusable.csv"
ls "$LABSYNC_INBOX" | sed 's/^/  inbox: /'
# orders_unusable.csv is unusable on purpose: it goes to failed/ and the run ends `failed` (red),
# which is how a run says a person is needed; the other files are loaded all the same
"$bin/airflow" dags test order_batches > "$demo/logs/order_batches.log" 2>&1 || true
if ! grep -q "need attention" "$demo/logs/order_batches.log"; then
  tail -40 "$demo/logs/order_batches.log"; exit 1
fi
printf '  the run ended failed, as it should: '
grep -o "[0-9]* batch(es) need attention: .*\. Unsettled" "$demo/logs/order_batches.log" | head -1 | sed 's/\. Unsettled$//'

step "the outcome table (labsync batches)"
"$bin/labsync" batches

step "one batch's rows (labsync status --batch orders_broken.csv)"
"$bin/labsync" status --batch orders_broken.csv || true

step "rows left to send again (labsync retry: what every order_batches run also does)"
"$bin/labsync" retry || true

step "where things are"
cat <<TXT
  ledger + batches:  $demo/labsync.db   (tables lgc_orders, lgc_outbox, batch_files, rejected_rows, rupa_*)
  processed files:   $LABSYNC_INBOX/processed/   (FILE.rejects.csv, FILE.summary.html beside each)
  unusable files:    $LABSYNC_INBOX/failed/
  DAG logs:          $demo/logs/
TXT
find "$LABSYNC_INBOX/processed" "$LABSYNC_INBOX/failed" -type f | sort | sed 's/^/  /'
