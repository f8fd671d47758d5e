"""The Airflow DAGs: integrity (DagBag), no work at import time, and end-to-end runs with
dag.test() against the sandboxes. Airflow runs in subprocesses with a temp AIRFLOW_HOME that is
migrated and reserialized first; the sandbox runs here, so the tests can look inside it."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys

import pytest
import sqlalchemy as sa

from etl import warehouse
from etl.sandbox.rupa import RupaSandbox
from etl.sandbox.server import Sandbox, SandboxServer
from etl.warehouse import (
    batch_files,
    lgc_orders,
    lgc_outbox,
    rejected_rows,
    rupa_lab_tests,
    rupa_patients,
)
from tests.conftest import migrated
from tests.helpers import EXAMPLES, REPO

pytestmark = pytest.mark.airflow
DAGS = REPO / "dags"


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow_home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LABSYNC_", "LGC_", "RUPA_"))}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
        AIRFLOW__LOGGING__LOGGING_LEVEL="WARNING",
        PYTHONPATH=str(REPO),
    )
    airflow = str(REPO / ".venv" / "bin" / "airflow") if (REPO / ".venv/bin/airflow").exists() else "airflow"
    for cmd in (["db", "migrate"], ["pools", "set", "lgc_api", "4", "LetsGetChecked API slots"],
                ["dags", "reserialize"]):
        done = subprocess.run([airflow, *cmd], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return env


def probe(env: dict, *args: str, extra: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, "-m", "tests.airflow_probe", *args], env={**env, **(extra or {})},
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("PROBE ")]
    assert lines, f"probe failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(lines[-1][len("PROBE "):])


def test_dagbag_loads_both_dags_with_the_expected_shape(airflow_env):
    facts = probe(airflow_env, "integrity")
    assert facts["import_errors"] == {}
    dags = facts["dags"]
    assert set(dags) == {"rupa_extract", "order_batches", "rupa_checkout", "lgc_lifecycle", "labsync_retention"}

    rupa = dags["rupa_extract"]
    assert rupa["tasks"] == ["extract_lab_tests", "extract_patients"]
    assert rupa["schedule"] == "@hourly" and rupa["catchup"] is False and rupa["max_active_runs"] == 1
    assert rupa["outlets"] == {"extract_lab_tests": ["rupa_lab_tests"], "extract_patients": ["rupa_patients"]}

    batches = dags["order_batches"]
    assert batches["tasks"] == ["check", "chunks", "finish", "load", "prepare"]
    assert batches["schedule"] == "*/5 * * * *" and batches["catchup"] is False and batches["max_active_runs"] == 1
    assert batches["trigger_rules"]["finish"] == "all_done"  # summaries and moves whatever happened
    assert batches["trigger_rules"]["check"] == "none_failed"  # a load that failed for good fails the run
    assert batches["retries"]["check"] == 0
    assert batches["pools"]["load"] == "lgc_api"
    assert batches["outlets"]["load"] == ["lgc_orders"]  # the task that changes the ledger marks it
    assert batches["map_index_templates"] == {"load": "{{ chunk_label }}"}
    assert batches["timeouts"]["load"] == 30 * 60  # above LGC_LOAD_DEADLINE (15 minutes)

    checkout = dags["rupa_checkout"]
    assert checkout["tasks"] == ["intents", "rupa_events"]
    assert checkout["schedule"] == "*/5 * * * *" and checkout["catchup"] is False and checkout["max_active_runs"] == 1

    life = dags["lgc_lifecycle"]
    assert life["tasks"] == ["apply_webhooks", "fetch_results", "poll_letters", "program_pages", "sweep"]
    assert life["schedule"] == "*/15 * * * *" and life["catchup"] is False and life["max_active_runs"] == 1
    assert life["outlets"] == {"apply_webhooks": ["lgc_order_items"], "sweep": ["lgc_order_items"],
                               "fetch_results": ["lgc_results"], "poll_letters": ["lgc_outreach_letters"],
                               "program_pages": []}
    assert life["trigger_rules"]["sweep"] == life["trigger_rules"]["fetch_results"] == "all_done"
    assert life["trigger_rules"]["poll_letters"] == life["trigger_rules"]["program_pages"] == "all_done"

    retention = dags["labsync_retention"]  # issue 23: the daily purge (etl.retention)
    assert retention["tasks"] == ["purge"]
    assert retention["schedule"] == "@daily" and retention["catchup"] is False and retention["max_active_runs"] == 1

    # every task of every DAG has a timeout (a hung vendor call must not hold a worker slot forever)
    for dag_id, facts_of in dags.items():
        for task_id, timeout in facts_of["timeouts"].items():
            assert timeout == (30 * 60 if task_id == "load" else 60 * 60), (dag_id, task_id, timeout)


def test_timeouts_are_configurable(airflow_env):
    facts = probe(airflow_env, "integrity", extra={"LABSYNC_TASK_TIMEOUT_MINUTES": "10",
                                                   "LABSYNC_LOAD_TIMEOUT_MINUTES": "45"})
    assert facts["dags"]["order_batches"]["timeouts"] == {"prepare": 600, "chunks": 600, "load": 2700,
                                                          "finish": 600, "check": 600}
    assert set(facts["dags"]["rupa_extract"]["timeouts"].values()) == {600}


def test_schedules_are_configurable(airflow_env):
    facts = probe(airflow_env, "integrity", extra={"LABSYNC_RUPA_SCHEDULE": "0 3 * * *", "LABSYNC_INBOX_SCHEDULE": "@daily",
                                                   "LABSYNC_RUPA_CHECKOUT_SCHEDULE": "*/15 * * * *",
                                                   "LABSYNC_LIFECYCLE_SCHEDULE": "@hourly"})
    assert facts["dags"]["rupa_extract"]["schedule"] == "0 3 * * *"
    assert facts["dags"]["order_batches"]["schedule"] == "@daily"
    assert facts["dags"]["rupa_checkout"]["schedule"] == "*/15 * * * *"
    assert facts["dags"]["lgc_lifecycle"]["schedule"] == "@hourly"


@pytest.mark.parametrize("dag_file", ["rupa_extract.py", "order_batches.py", "rupa_checkout.py", "lgc_lifecycle.py",
                                      "labsync_retention.py"])
def test_dag_files_do_no_work_at_import(airflow_env, dag_file):
    facts = probe(airflow_env, "imports", str(DAGS / dag_file))
    assert facts["heavy_imports"] == []


@pytest.fixture
def sandboxes():
    with SandboxServer(Sandbox(rupa=RupaSandbox(patients=120, lab_tests=15))) as server:
        yield server


def test_order_batches_end_to_end(airflow_env, sandboxes, tmp_path, inbox_location):
    """On a local folder and on the S3 server alike: the tasks share nothing but the warehouse
    and the inbox's store (each reads the store itself; the AWS_* variables reach them)."""
    from tests.inboxes import InboxView

    inbox = InboxView(inbox_location)
    inbox.drop("orders.csv", "orders_broken.csv", "orders_unusable.csv")
    url = migrated(f"sqlite:///{tmp_path / 'warehouse.db'}")
    extra = dict(LABSYNC_WAREHOUSE_URL=url, LABSYNC_INBOX=inbox_location, LABSYNC_INBOX_SETTLE_SECONDS="0",
                 LABSYNC_CHUNK_ROWS="4", LGC_BASE_URL=sandboxes.lgc_url, LABSYNC_RETRY_INITIAL_WAIT="0.01",
                 **{k: v for k, v in os.environ.items() if k.startswith("AWS_")})

    first = probe(airflow_env, "test", "order_batches", extra=extra)
    # the unusable file went to failed/ and the others were loaded: the run says a file needs a person
    assert first["state"] == "failed", first
    assert sorted(k for k in first["tasks"] if k.startswith("load[")) == ["load[0]", "load[1]", "load[2]", "load[3]"]
    assert {k: v for k, v in first["tasks"].items() if v != "success"} == {"check": "failed"}
    # the UI names each load task by its file and lines, not "Map Index 2"
    labels = sorted(first["labels"].values())
    assert labels[:3] == ["orders.csv lines 10-11 (2 rows)", "orders.csv lines 2-5 (4 rows)",
                          "orders.csv lines 6-9 (4 rows)"], labels
    assert re.fullmatch(r"orders_broken\.csv lines \d+-\d+ \(2 rows\)", labels[3]), labels
    # finish returns (XCom) where each summary is
    locations = sorted(o["summary_location"] for o in first["returned"]["finish"])
    assert locations == sorted(f"{inbox.location}/{p}" for p in ("processed/orders.summary.html",
                                                         "processed/orders_broken.summary.html",
                                                         "failed/orders_unusable.summary.html"))

    lgc = sandboxes.sandbox.lgc
    assert len(lgc.orders) == 12 and set(lgc.accepted_count.values()) == {1}
    engine = warehouse.connect(url)
    with engine.connect() as conn:
        states = dict(conn.execute(sa.select(lgc_orders.c.client_order_id, lgc_orders.c.state)).all())
        n_rejects = conn.execute(sa.select(sa.func.count()).select_from(rejected_rows)).scalar_one()
    assert len(states) == 12 and set(states.values()) == {"accepted"}
    assert n_rejects == 13
    # issue 23: the reports and summaries written are audited as the task instances that wrote them
    from etl import audit

    written = audit.query(engine, action="report written")
    assert {r["actor"].split(".")[0] for r in written} == {"airflow:order_batches"}
    assert {r["actor"].split(".")[1] for r in written} == {"prepare", "finish"}
    assert inbox.names("processed") == [
        "orders.csv", "orders.summary.html", "orders_broken.csv", "orders_broken.fix.csv",
        "orders_broken.rejects.csv", "orders_broken.summary.html"]
    assert inbox.names("failed") == ["orders_unusable.csv", "orders_unusable.summary.html"]
    assert inbox.names() == []

    puts = sum(lgc.put_count.values())
    inbox.put(EXAMPLES / "orders.csv", "orders again.csv")  # a re-dropped copy
    second = probe(airflow_env, "test", "order_batches", extra=extra)
    assert second["state"] == "success", second
    assert sum(lgc.put_count.values()) == puts  # nothing new sent
    assert "Already processed" in inbox.read("processed/orders again.summary.html")


def test_order_batches_fails_while_the_vendor_is_down_and_succeeds_once_a_later_run_sends_the_rows(
        airflow_env, sandboxes, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(EXAMPLES / "orders.csv", inbox / "orders.csv")
    url = migrated(f"sqlite:///{tmp_path / 'warehouse.db'}")
    extra = dict(LABSYNC_WAREHOUSE_URL=url, LABSYNC_INBOX=str(inbox), LABSYNC_INBOX_SETTLE_SECONDS="0",
                 LABSYNC_CHUNK_ROWS="5", LGC_BASE_URL=sandboxes.lgc_url, LABSYNC_RETRY_INITIAL_WAIT="0.01",
                 LABSYNC_RETRY_MAX_WAIT="0.02", LABSYNC_RETRY_ATTEMPTS="2")
    lgc = sandboxes.sandbox.lgc
    lgc.faults.update(error_rate=1.0, exempt_paths=["/lgc/oauth2"])  # every PUT: 500/503

    down = probe(airflow_env, "test", "order_batches", extra=extra)
    assert down["state"] == "failed", down
    assert down["tasks"]["check"] == "failed" and down["tasks"]["finish"] == "success"
    assert lgc.orders == {} and lgc.faults.injected["errors"] >= 10  # every row was tried
    engine = warehouse.connect(url)
    with engine.connect() as conn:
        status = conn.execute(sa.select(batch_files.c.status)).scalar_one()
        outcomes = set(conn.execute(sa.select(lgc_outbox.c.outcome)).scalars())
    assert status == "incomplete" and outcomes == {"failed"}
    assert (inbox / "processed" / "orders.csv").exists()  # summary and move happened anyway

    lgc.faults.reset()  # the vendor is back; nothing is dropped again
    later = probe(airflow_env, "test", "order_batches", extra=extra)
    assert later["state"] == "success", later
    assert sorted(k for k in later["tasks"] if k.startswith("load[")) == ["load[0]", "load[1]"]
    assert len(lgc.orders) == 10 and set(lgc.accepted_count.values()) == {1}
    with engine.connect() as conn:
        assert conn.execute(sa.select(batch_files.c.status)).scalar_one() == "loaded"
    assert "All 10 rows went through" in (inbox / "processed" / "orders.summary.html").read_text()


def test_a_task_with_no_lgc_connection_and_no_variable_names_both(airflow_env, tmp_path):
    code = ("from etl.airflow.tasks import airflow_settings\n"
            "from etl.errors import ConfigError\n"
            "try:\n    airflow_settings(require=('lgc',))\n"
            "except ConfigError as exc:\n    print('PROBE', exc)\n")
    env = {k: v for k, v in airflow_env.items() if not k.startswith("AIRFLOW_CONN_")}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    said = done.stdout.split("PROBE", 1)[-1]
    assert "'lgc_default'" in said and "LGC_BASE_URL" in said, done.stdout + done.stderr
    with_var = subprocess.run([sys.executable, "-c", code.replace("print('PROBE', exc)", "print('PROBE', 'raised')")
                               + "else:\n    print('PROBE ok')\n"],
                              env={**env, "LGC_BASE_URL": "https://lgc.example"}, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    assert "PROBE ok" in with_var.stdout, with_var.stdout + with_var.stderr


def test_rupa_extract_end_to_end(airflow_env, sandboxes, tmp_path):
    url = migrated(f"sqlite:///{tmp_path / 'warehouse.db'}")
    token = sandboxes.sandbox.rupa.mint_access_token()
    extra = dict(LABSYNC_WAREHOUSE_URL=url, RUPA_BASE_URL=sandboxes.rupa_url, RUPA_API_TOKEN=token, RUPA_PAGE_SIZE="25")
    result = probe(airflow_env, "test", "rupa_extract", extra=extra)
    assert result["state"] == "success", result
    assert result["tasks"] == {"extract_patients": "success", "extract_lab_tests": "success"}
    engine = warehouse.connect(url)
    with engine.connect() as conn:
        patients = conn.execute(sa.select(sa.func.count()).select_from(rupa_patients)).scalar_one()
        lab_tests = conn.execute(sa.select(sa.func.count()).select_from(rupa_lab_tests)).scalar_one()
    assert (patients, lab_tests) == (120, 15)


def test_rupa_checkout_end_to_end(airflow_env, sandboxes, tmp_path):
    """intents: a file in inbox/intents/ becomes carts and a checkout report; rupa_events: the
    sandbox's events (checkout, results) stored by the receiver land in the warehouse."""
    from etl.asgi import BackgroundServer
    from etl.settings import WebhookSettings
    from etl.warehouse import rupa_order_intents, rupa_orders, rupa_results
    from etl.webhooks.app import build_app
    from tests.rupa_support import write_intents

    url = migrated(f"sqlite:///{tmp_path / 'warehouse.db'}")
    engine = warehouse.connect(url)
    rupa = sandboxes.sandbox.rupa
    inbox = tmp_path / "inbox"
    (inbox / "intents").mkdir(parents=True)
    token = rupa.mint_access_token()
    extra = dict(LABSYNC_WAREHOUSE_URL=url, LABSYNC_INBOX=str(inbox), LABSYNC_INBOX_SETTLE_SECONDS="0",
                 RUPA_BASE_URL=sandboxes.rupa_url, RUPA_API_TOKEN=token, LABSYNC_RETRY_INITIAL_WAIT="0.01")
    from dataclasses import replace

    from etl.extract.streams import extract_all
    from etl.settings import Settings

    base = Settings()
    extract_all(engine, replace(base, warehouse_url=url, rupa=replace(
        base.rupa, base_url=sandboxes.rupa_url, api_token=token)))  # the cross-check's copy (rupa_extract's job)
    write_intents(inbox / "intents" / "carts.csv", [
        {"row_id": "D1", "rupa_patient_id": "pat_0000001", "lab_test_ids": "labts_0000001", "return_url": "https://a.example/r"},
        {"row_id": "D2", "rupa_patient_id": "pat_0000404", "return_url": "https://a.example/r"}])
    path_secret = secrets.token_urlsafe(32)  # Rupa's deliveries authenticated by a capability path
    with BackgroundServer(build_app(engine, WebhookSettings(rupa_path_secret=path_secret))) as receiver:
        rupa.checkout.sender.configure(url=f"{receiver.url}/webhooks/rupa/{path_secret}")
        first = probe(airflow_env, "test", "rupa_checkout", extra=extra)
        assert first["state"] == "success", first
        assert first["tasks"] == {"intents": "success", "rupa_events": "success"}
        assert sorted(p.name for p in (inbox / "intents" / "processed").iterdir()) == [
            "carts.checkout.csv", "carts.csv", "carts.rejects.csv", "carts.summary.html"]
        with engine.connect() as conn:
            intent_id = conn.execute(sa.select(rupa_order_intents.c.order_intent_id)).scalar_one()
        order_id = rupa.checkout.submit(intent_id)
        rupa.checkout.add_results(order_id)
        assert rupa.checkout.sender.flush()
        second = probe(airflow_env, "test", "rupa_checkout", extra=extra)
        assert second["state"] == "success", second
    with engine.connect() as conn:
        status = conn.execute(sa.select(rupa_orders.c.status).where(rupa_orders.c.id == order_id)).scalar_one()
        n_results = conn.execute(sa.select(sa.func.count()).select_from(rupa_results)).scalar_one()
    assert status == "Results Received" and n_results == 2


def test_lgc_lifecycle_end_to_end(airflow_env, sandboxes, tmp_path):
    from etl.orders.load import load_rows
    from etl.settings import LgcSettings, Settings
    from etl.warehouse.tables import lgc_order_items, lgc_results, webhook_events
    from tests.lifecycle_support import receiver, send_webhooks_to
    from tests.test_lgc_support import order_row

    url = migrated(f"sqlite:///{tmp_path / 'warehouse.db'}")
    engine = warehouse.connect(url)
    settings = Settings(warehouse_url=url, lgc=LgcSettings(base_url=sandboxes.lgc_url, rate_limit=0))
    assert load_rows(engine, settings, [order_row(i) for i in range(2)]).counts == {"accepted": 2}
    sb = sandboxes.sandbox.lgc.lifecycle
    with receiver(engine) as rx:  # order A is notified all the way to its results...
        send_webhooks_to(sandboxes, rx)
        sb.advance("ORD-00000", to="ResultsAvailable")
        assert sb.wait_idle()
    sb.configure(webhook_url=None)  # ...order B's notifications never arrive: the sweep finds it
    sb.advance("ORD-00001", steps=2)

    extra = dict(LABSYNC_WAREHOUSE_URL=url, LGC_BASE_URL=sandboxes.lgc_url, LABSYNC_RETRY_INITIAL_WAIT="0.01",
                 LABSYNC_INBOX=str(tmp_path / "inbox"))
    result = probe(airflow_env, "test", "lgc_lifecycle", extra=extra)
    assert result["state"] == "success", result
    assert result["tasks"] == {"apply_webhooks": "success", "sweep": "success", "fetch_results": "success",
                               "poll_letters": "success", "program_pages": "success"}
    assert (tmp_path / "inbox" / "programs" / "Health4All" / "index.html").is_file()  # issue 25
    with engine.connect() as conn:
        statuses = conn.execute(sa.select(lgc_order_items.c.client_order_id, lgc_order_items.c.status)).all()
        results = conn.execute(sa.select(sa.func.count()).select_from(lgc_results)).scalar_one()
        states = set(conn.execute(sa.select(webhook_events.c.state)).scalars())
    assert sorted(statuses) == [("ORD-00000", "ResultsAvailable")] * 2 + [("ORD-00001", "KitDispatched")] * 2
    assert results == 2 and states == {"applied"}
