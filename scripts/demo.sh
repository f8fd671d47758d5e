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

step "after the PUT: one order from accepted to ResultsAvailable (signed webhooks + DAG lgc_lifecycle)"
hooks_port=$("$bin/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
LGC_WEBHOOK_KEY=$("$bin/python" -c "import base64, secrets; print(base64.b64encode(secrets.token_bytes(32)).decode())")
export LGC_WEBHOOK_KEY
# Rupa publishes no signature scheme: its deliveries are authenticated by a capability URL
RUPA_WEBHOOK_PATH=$("$bin/python" -c "import secrets; print(secrets.token_urlsafe(32))")
export RUPA_WEBHOOK_PATH
"$bin/labsync" webhooks serve --port "$hooks_port" > "$demo/logs/webhooks.log" 2>&1 &
hooks_pid=$!
trap 'kill $sandbox_pid $hooks_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$hooks_port/healthz" >/dev/null 2>&1 && break
  kill -0 $hooks_pid 2>/dev/null || { cat "$demo/logs/webhooks.log"; exit 1; }
  sleep 0.2
done
order=$("$bin/labsync" status --batch orders.csv --json | "$bin/python" -c "import json, sys; print([r['client_order_id'] for r in json.load(sys.stdin) if r['state'] == 'accepted'][0])")
echo "  receiver on 127.0.0.1:$hooks_port (signature checked); the sandbox now signs and sends its webhooks there"
curl -fs -X POST "http://127.0.0.1:$port/_sandbox/lgc/lifecycle" \
  -d "{\"webhook_url\": \"http://127.0.0.1:$hooks_port/webhooks/lgc\", \"webhook_key\": \"$LGC_WEBHOOK_KEY\", \"duplicates\": true}" > /dev/null
echo "  LetsGetChecked moves order $order along: Created, KitDispatched, KitRegistered, KitArrivedAtLab, ResultsAvailable"
curl -fs -X POST "http://127.0.0.1:$port/_sandbox/lgc/advance" -d "{\"client_order_id\": \"$order\", \"to\": \"ResultsAvailable\"}" > /dev/null
for _ in $(seq 1 100); do
  [ "$(curl -fs "http://127.0.0.1:$port/_sandbox/lgc/lifecycle" | "$bin/python" -c "import json, sys; print(json.load(sys.stdin)['queued'])")" = 0 ] && break
  sleep 0.2
done
"$bin/airflow" dags test lgc_lifecycle > "$demo/logs/lgc_lifecycle.log" 2>&1 || { tail -40 "$demo/logs/lgc_lifecycle.log"; exit 1; }
"$bin/labsync" status "$order"
"$bin/python" - "$order" <<'PY'
import sys
import sqlalchemy as sa
from etl import warehouse
from etl.settings import Settings
from etl.warehouse.tables import lgc_item_status_history as h, lgc_result_values as v, lgc_results as r, webhook_events as w
engine = warehouse.connect(Settings.from_env().warehouse_url)
order = sys.argv[1]
with engine.connect() as c:
    events = c.execute(sa.select(sa.func.count(), sa.func.sum(w.c.deliveries)).where(w.c.source == "lgc")).one()
    print(f"  webhook_events: {events[0]} LetsGetChecked events stored ({events[1]} deliveries: each was sent twice)")
    for row in c.execute(sa.select(h.c.item_id, h.c.status, h.c.source, h.c.vendor_timestamp)
                         .where(h.c.client_order_id == order).order_by(h.c.item_id, h.c.id)):
        print(f"  history  {row.item_id[:8]}  {row.status:<17} {row.source:<8} {row.vendor_timestamp}")
    for row in c.execute(sa.select(r.c.barcode, r.c.value_count, sa.func.length(r.c.json_body).label("j"),
                                   sa.func.length(r.c.hl7_body).label("h")).where(r.c.client_order_id == order)):
        print(f"  results  {row.barcode}: {row.value_count} values parsed into lgc_result_values; "
              f"raw JSON {row.j} bytes and HL7 {row.h} bytes in lgc_results")
PY
echo "  (result values are PHI: they stay in the warehouse and are never printed or logged)"

step "Rupa Checkout: an order-intents batch, one cart checked out, its order and results in the warehouse"
curl -fs -X POST "http://127.0.0.1:$port/_sandbox/rupa/events" \
  -d "{\"url\": \"http://127.0.0.1:$hooks_port/webhooks/rupa/$RUPA_WEBHOOK_PATH\"}" >/dev/null
echo "  the Rupa sandbox sends its events to the same receiver (127.0.0.1:$hooks_port/webhooks/rupa/<RUPA_WEBHOOK_PATH>, a capability URL)"
mkdir -p "$LABSYNC_INBOX/intents"
sed "s#https://practice.example/rupa/return#http://127.0.0.1:$hooks_port/webhooks/rupa/return#" \
  examples/intents.csv > "$LABSYNC_INBOX/intents/intents.csv"
echo "  inbox: intents/intents.csv (5 rows: known patients, new ones, an unknown id, a missing email)"
"$bin/airflow" dags test rupa_checkout > "$demo/logs/rupa_checkout.log" 2>&1 || { tail -40 "$demo/logs/rupa_checkout.log"; exit 1; }
echo "  the checkout links (intents/processed/intents.checkout.csv):"
cut -d, -f2,5,6 "$LABSYNC_INBOX/intents/processed/intents.checkout.csv" | sed 's/^\xEF\xBB\xBF//; s/^/    /'
echo "  a practitioner opens the first link and submits the checkout (as a browser would):"
"$bin/python" - <<'PY'
import csv, os, httpx
path = os.path.join(os.environ["LABSYNC_INBOX"], "intents", "processed", "intents.checkout.csv")
first = next(csv.DictReader(open(path, encoding="utf-8-sig")))
page = httpx.post(first["checkout_url"], data={"payer": "Patient"}, follow_redirects=True)
print(f"    {first['row_id']}: returned to {page.url.path}?{page.url.query.decode()}")
PY
echo "  the lab moves the order on and posts results (sandbox):"
curl -fs -X POST "http://127.0.0.1:$port/_sandbox/rupa/orders/latest" -d '{"status": "In Progress", "results": true}' | sed 's/^/    /'; echo
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$port/_sandbox/rupa/events" | grep -q '"queued":0' && break
  sleep 0.2
done
"$bin/labsync" rupa apply-events | sed 's/^/  /'
"$bin/python" - <<'PY'
import sqlalchemy as sa
from etl import warehouse
from etl.settings import Settings
engine = warehouse.connect(Settings.from_env().warehouse_url)
with engine.connect() as c:
    for r in c.execute(sa.text("select i.row_id, o.id, o.status, o.order_intent_id from rupa_orders o "
                               "left join rupa_order_intents i on i.order_intent_id = o.order_intent_id")):
        print(f"  order {r.id}: {r.status}, from order intent {r.order_intent_id} (intents row {r.row_id})")
    for r in c.execute(sa.text("select ordered_test_id, kind, size, sha256 from rupa_results order by id")):
        print(f"  result {r.ordered_test_id} {r.kind}: {r.size} bytes, sha256 {r.sha256[:16]}…")
PY
echo "  summary with clickable checkout links: $LABSYNC_INBOX/intents/processed/intents.summary.html"

step "one table of lab observations for both vendors (lab_observations), checked against the documents"
"$bin/python" - <<'PY'
import sqlalchemy as sa
from etl import warehouse
from etl.results import observations
from etl.settings import Settings
from etl.warehouse.tables import lab_observations as t
engine = warehouse.connect(Settings.from_env().warehouse_url)
with engine.connect() as c:
    for r in c.execute(sa.select(t.c.vendor, t.c.interpretation, sa.func.count()).where(t.c.current.is_(True))
                       .group_by(t.c.vendor, t.c.interpretation).order_by(t.c.vendor, t.c.interpretation)):
        print(f"  {r[0]:<5} {r[1]:<9} {r[2]} observations")
for vendor, n in observations.verify(engine).items():
    print(f"  {vendor}: {n['matched']} of {n['observations']} observations match their {n['documents']} source documents")
    assert n["observations"] > 0 and n["matched"] == n["observations"], vendor
PY
echo "  (values stay in the warehouse: only counts, codes and flags are printed)"
"$bin/labsync" results --flagged --level abnormal | sed 's/^/  /'
"$bin/labsync" export fhir --out "$demo/fhir" | sed 's/^/  /'
ls "$demo/fhir" | sed 's/^/  fhir: /'
