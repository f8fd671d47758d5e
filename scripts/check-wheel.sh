#!/usr/bin/env bash
# Does the wheel install into an existing Airflow deployment? Builds labsync's wheel, then:
#   1. a fresh venv with the lowest supported Airflow (scripts/airflow-lowest-constraints.txt);
#      labsync's wheel installed into it must leave every apache-airflow* package and SQLAlchemy
#      where they were, `uv pip check` must be clean, the same install beside Airflow 3.0 must be
#      refused before anything is installed, and with the DAG folder `airflow dags
#      reserialize` + `airflow dags list` must show the four DAGs with no import error,
#      Airflow must list the labsync connection types with their forms, and `airflow dags test order_batches`
#      must load two example files into the sandbox LetsGetChecked (Airflow 3.1 on SQLAlchemy 2);
#   2. a fresh venv with the wheel alone (a worker image without the web extras): the clients
#      import, and `labsync sandbox` says which extra it needs (exit 2) instead of a traceback.
# Usage: scripts/check-wheel.sh [WORKDIR]   (uv and its cache: seconds once the cache is warm)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
mkdir -p "$work"
export PATH="$HOME/.local/bin:$PATH"
command -v uv >/dev/null || { echo "check-wheel: needs uv (pip install uv)" >&2; exit 2; }
py=${PYTHON:-python3}
start=$SECONDS
say() { echo "check-wheel: [$((SECONDS - start))s] $*"; }

# sdist first, then the wheel from the unpacked sdist (uv build's default): nothing is written into
# the source tree but the egg-info, and the wheel holds only what a release would
uv build --quiet --out-dir "$work/dist" "$repo" 2>"$work/build.log" || { cat "$work/build.log" >&2; exit 1; }
wheel=$(ls "$work"/dist/labsync-*.whl)
say "built $(basename "$wheel")"

# ---- 1. beside the lowest supported Airflow ---------------------------------------------------
venv="$work/airflow-venv"
uv venv --quiet --python "$py" "$venv"
uv pip install --quiet --python "$venv/bin/python" -r "$repo/scripts/airflow-lowest-constraints.txt"
core() { uv pip freeze --python "$venv/bin/python" 2>/dev/null | grep -i -E '^(apache-airflow[a-z-]*|sqlalchemy)==' | sort; }
core > "$work/core.before"
say "airflow venv: $(grep -i '^apache-airflow==' "$work/core.before") $(grep -i '^sqlalchemy==' "$work/core.before")"
# as the README says: the wheel with the deployment's Airflow pinned, so the resolver sees both
uv pip install --quiet --python "$venv/bin/python" "$wheel" "apache-airflow==$(
  grep -i '^apache-airflow==' "$work/core.before" | cut -d= -f3)"
core > "$work/core.after"
if ! diff -u "$work/core.before" "$work/core.after"; then
  say "installing labsync changed the deployment's core packages (above)" >&2; exit 1
fi
uv pip check --python "$venv/bin/python" >"$work/check.log" 2>&1 || { cat "$work/check.log" >&2; exit 1; }
say "pip check: $(tail -1 "$work/check.log")"
# ...and on Airflow 3.0 (which pins sqlalchemy<2.0) the same command refuses before installing
if uv pip install --dry-run --python "$venv/bin/python" "$wheel" "apache-airflow==3.0.6" \
    >"$work/refused.log" 2>&1 || ! grep -q "sqlalchemy" "$work/refused.log"; then
  cat "$work/refused.log" >&2; say "Airflow 3.0.6 was not refused up front" >&2; exit 1
fi
say "beside apache-airflow==3.0.6: refused up front (it pins sqlalchemy<2.0)"

export AIRFLOW_HOME="$work/airflow-home" AIRFLOW__CORE__DAGS_FOLDER="$repo/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False AIRFLOW__LOGGING__LOGGING_LEVEL=ERROR PYTHONWARNINGS=ignore
af() { (cd "$work" && "$venv/bin/airflow" "$@"); }  # not from the repo: the installed wheel is used
af db migrate >"$work/migrate.log" 2>&1 || { tail -20 "$work/migrate.log" >&2; exit 1; }
af dags reserialize >"$work/reserialize.log" 2>&1 || { tail -20 "$work/reserialize.log" >&2; exit 1; }
af dags list -o json >"$work/dags.json" 2>"$work/dags.log" || { tail -20 "$work/dags.log" >&2; exit 1; }
# Airflow 3.1 builds connection forms from the Hooks' wtforms fields, which need the FAB provider
uv pip install --quiet --python "$venv/bin/python" apache-airflow-providers-fab \
  -c "$repo/scripts/airflow-lowest-constraints.txt"
# one Python process for the rest (each `airflow` command starts Airflow again)
(cd "$work" && "$venv/bin/python" - "$work/dags.json" "$AIRFLOW__CORE__DAGS_FOLDER") <<'PY'
import json, sys

from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService
from airflow.models.dagbag import DagBag
from airflow.providers_manager import ProvidersManager

text = open(sys.argv[1]).read()
dags = sorted(d["dag_id"] for d in json.loads(text[text.index("["):]))
assert dags == ["labsync_retention", "lgc_lifecycle", "order_batches", "rupa_checkout", "rupa_extract"], dags
errors = DagBag(dag_folder=sys.argv[2], include_examples=False).import_errors
assert not errors, errors
hooks = {t: h.hook_class_name for t, h in ProvidersManager().hooks.items() if h and t.startswith("labsync")}
assert hooks == {"labsync-lgc": "etl.airflow.hooks.LgcHook", "labsync-rupa": "etl.airflow.hooks.RupaHook"}, hooks
forms = {m.connection_type: m.model_dump() for m in HookMetaService.hook_meta_data()}  # the UI's form
lgc = forms["labsync-lgc"]
assert lgc["standard_fields"]["login"]["title"] == "Access key" and lgc["standard_fields"]["port"]["hidden"], lgc
network = ["ca_bundle", "client_cert", "client_key", "proxy", "timeout"]  # as Airflow's HTTP provider
assert sorted(lgc["extra_fields"]) == sorted(["access_token", "client_id", *network]), lgc
assert lgc["extra_fields"]["access_token"]["schema"]["format"] == "password", lgc
assert sorted(forms["labsync-rupa"]["extra_fields"]) == sorted(["access_token", *network]), forms["labsync-rupa"]
print(f"check-wheel: airflow dags list: {', '.join(dags)}; import errors: none; "
      f"connection types: {', '.join(sorted(hooks))} (with their forms)")
PY

# the real DAG on this Airflow: the sandbox (its web stack comes with Airflow here), a SQLite
# warehouse, two example files
run="$work/run"
mkdir -p "$run/inbox"
cp "$repo/examples/orders.csv" "$repo/examples/orders_broken.csv" "$run/inbox/"
port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export LABSYNC_WAREHOUSE_URL="sqlite:///$run/warehouse.db" LABSYNC_INBOX="$run/inbox"
export LABSYNC_INBOX_SETTLE_SECONDS=0 LABSYNC_CHUNK_ROWS=4 LGC_BASE_URL="http://127.0.0.1:$port/lgc"
(cd "$work" && "$venv/bin/labsync" db upgrade >/dev/null)
(cd "$work" && exec "$venv/bin/labsync" sandbox --port "$port" >"$run/sandbox.log" 2>&1) &
sandbox_pid=$!
trap 'kill "$sandbox_pid" 2>/dev/null; wait "$sandbox_pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  "$venv/bin/python" -c "import socket,sys; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null && break
  sleep 0.1
done
af pools set lgc_api 4 "LetsGetChecked API" >/dev/null 2>&1
af dags test order_batches >"$run/dags-test.log" 2>&1 || { tail -40 "$run/dags-test.log" >&2; exit 1; }
accepted=$("$venv/bin/python" -c "import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute(
  \"select count(*) from lgc_orders where state = 'accepted'\").fetchone()[0])" "$run/warehouse.db")
[ "$accepted" = 12 ] || { say "order_batches on Airflow 3.1: $accepted orders accepted, expected 12" >&2; exit 1; }
say "airflow dags test order_batches: 12 orders accepted, files in $(ls "$run/inbox/processed" | wc -l | tr -d ' ') processed/ entries"

# ---- 2. the wheel alone: no web servers, no Airflow -------------------------------------------
bare="$work/bare-venv"
uv venv --quiet --python "$py" "$bare"
uv pip install --quiet --python "$bare/bin/python" "$wheel"
(cd "$work" && "$bare/bin/python" -c "import etl.lgc.client, etl.rupa.client, etl.airflow.tasks, etl.airflow.provider")
set +e
said=$(cd "$work" && "$bare/bin/labsync" sandbox 2>&1); code=$?
set -e
if [ "$code" != 2 ] || [[ "$said" != *"labsync[sandbox]"* ]]; then
  say "labsync sandbox without the extra: exit $code, said: $said" >&2; exit 1
fi
say "without extras: $said"
say "ok"
