"""Lineage, metrics and asset extras of the labsync tasks (etl.airflow.dagkit, observe, lineage):
one order_batches run under dag.test() with OpenLineage's file transport and StatsD aimed at a
UDP listener on loopback; the events name the inbox file, the vendor and the warehouse tables,
the listener sees labsync's counters, the asset event carries the counts, and none of them holds
the PHI planted in the file."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from etl.airflow.lineage import datasets, inbox_namespace, warehouse_namespace
from etl.settings import Settings
from tests.test_alerts import PLANTED, planted_rows
from tests.test_dags import airflow_env  # noqa: F401  (the module-scoped Airflow home fixture)
from tests.test_lgc_support import write_csv


class UdpListener:
    """A StatsD server stand-in: every datagram received on loopback."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._stop = threading.Event()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.lines.extend(data.decode("utf-8", "replace").splitlines())

    def __enter__(self) -> UdpListener:
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()
        self.sock.close()

    def counters(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in self.lines:
            name, _, rest = line.partition(":")
            value, _, kind = rest.partition("|")
            if kind.startswith("c"):
                out[name] = out.get(name, 0) + int(float(value))
        return out


def test_datasets_are_named_by_the_stores_namespaces_without_credentials():
    assert warehouse_namespace("postgresql+psycopg://u:secret@db.example:6543/labsync") == (
        "postgres://db.example:6543", "labsync.public.")
    assert inbox_namespace("s3://bucket/drop/zone") == ("s3://bucket", "drop/zone")
    settings = Settings(warehouse_url="postgresql+psycopg://u:secret@db.example/labsync")
    inputs, outputs = datasets("lgc_lifecycle", "fetch_results", settings)
    assert ("http://127.0.0.1:8765", "/lgc/v1/results") in inputs
    assert ("postgres://db.example:5432", "labsync.public.lgc_results") in outputs
    assert "secret" not in json.dumps([inputs, outputs])


@pytest.mark.airflow
def test_an_order_batches_run_reports_lineage_metrics_and_asset_extras(airflow_env, sandbox, tmp_path):  # noqa: F811
    from tests.conftest import migrated
    from tests.test_dags import probe

    box = tmp_path / "inbox"
    box.mkdir()
    write_csv(box / "orders.csv", planted_rows(3))
    url = migrated(f"sqlite:///{tmp_path / 'warehouse.db'}")
    events_file = tmp_path / "openlineage.jsonl"
    with UdpListener() as statsd:
        extra = dict(
            LABSYNC_WAREHOUSE_URL=url, LABSYNC_INBOX=str(box), LABSYNC_INBOX_SETTLE_SECONDS="0",
            LGC_BASE_URL=sandbox.lgc_url, LABSYNC_RETRY_INITIAL_WAIT="0.01",
            AIRFLOW__OPENLINEAGE__TRANSPORT=json.dumps({"type": "file", "log_file_path": str(events_file),
                                                        "append": True}),
            AIRFLOW__OPENLINEAGE__NAMESPACE="labsync-test",
            AIRFLOW__METRICS__STATSD_ON="True", AIRFLOW__METRICS__STATSD_HOST="127.0.0.1",
            AIRFLOW__METRICS__STATSD_PORT=str(statsd.port), AIRFLOW__METRICS__STATSD_PREFIX="airflow")
        result = probe(airflow_env, "test", "order_batches", extra=extra)
        assert result["state"] == "success", result
    # ---- asset events carry what happened (counts and the batch id) -----------------------------
    (event,) = [e for e in result["asset_events"] if e["asset"] == "lgc_orders"]
    assert event["extra"]["accepted"] == 3 and event["extra"]["sent"] == 3 and event["extra"]["batch_id"] == 1

    # ---- OpenLineage: the inbox file, the warehouse tables, the vendor ------------------------------
    runs = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]
    complete = {e["job"]["name"]: e for e in runs if e.get("eventType") == "COMPLETE"}
    prepare, load = complete["order_batches.prepare"], complete["order_batches.load"]
    wh = f"sqlite://{tmp_path / 'warehouse.db'}"
    assert {"namespace": "file", "name": str(box / "orders.csv")} in [
        {"namespace": d["namespace"], "name": d["name"]} for d in prepare["inputs"]]
    assert {(d["namespace"], d["name"]) for d in prepare["outputs"]} >= {(wh, "batch_files"), (wh, "lgc_outbox")}
    lgc_ns = sandbox.lgc_url.rsplit("/lgc", 1)[0]
    assert (lgc_ns, "/lgc/v1/orders") in {(d["namespace"], d["name"]) for d in load["outputs"]}
    assert (wh, "lgc_orders") in {(d["namespace"], d["name"]) for d in load["outputs"]}
    assert not [p for p in PLANTED if p in events_file.read_text()]

    # ---- StatsD: labsync's counters through Airflow's Stats ----------------------------------------
    seen = statsd.counters()
    assert seen.get("airflow.labsync.orders.sent") == 3, sorted(seen)
    assert seen.get("airflow.labsync.orders.outcome.accepted") == 3
    assert seen.get("airflow.labsync.intake.rows_validated") == 3
    assert seen.get("airflow.labsync.intake.files.validated") == 1
    assert any(line.startswith("airflow.labsync.task.load.duration:") for line in statsd.lines)
