"""Run inside a subprocess whose environment points AIRFLOW_HOME at a migrated temp home.

    python -m tests.airflow_probe integrity        -> JSON facts about the DagBag
    python -m tests.airflow_probe imports FILE      -> JSON: which heavy modules a DAG file imported
    python -m tests.airflow_probe test DAG_ID       -> runs dag.test(), JSON: run and task states
    python -m tests.airflow_probe providers         -> JSON: labsync's hooks, connection types, forms
    python -m tests.airflow_probe testconn JSON     -> the UI's Test button on Connections (a JSON list)
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

HEAVY = ("pandas", "pandera", "pyarrow", "sqlalchemy", "httpx", "etl")
# what a DAG file may read when Airflow parses it: its own settings, declared and checked with every
# other setting (etl.settings.DagSettings; the standard library only), and nothing else of labsync
PARSE_TIME = {"etl", "etl.settings", "etl.errors",
              # what every labsync DAG gets (issue 24): Airflow's decorator machinery, the work lazily
              "etl.airflow", "etl.airflow.dagkit"}


def integrity() -> dict:
    from airflow.models.dagbag import DagBag

    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    dags = {}
    for dag_id, dag in bag.dags.items():
        dags[dag_id] = {
            "tasks": sorted(dag.task_ids),
            "schedule": str(dag.schedule),
            "catchup": dag.catchup,
            "max_active_runs": dag.max_active_runs,
            "outlets": {t.task_id: sorted(getattr(o, "name", str(o)) for o in t.outlets) for t in dag.tasks},
            "trigger_rules": {t.task_id: getattr(t.trigger_rule, "value", str(t.trigger_rule)) for t in dag.tasks},
            "pools": {t.task_id: t.pool for t in dag.tasks},
            "retries": {t.task_id: t.retries for t in dag.tasks},
            "timeouts": {t.task_id: t.execution_timeout.total_seconds() if t.execution_timeout else None
                         for t in dag.tasks},
            "map_index_templates": {t.task_id: t.map_index_template for t in dag.tasks
                                    if getattr(t, "map_index_template", None)},
        }
    return {"import_errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": dags}


def imports(path: str) -> dict:
    import airflow.sdk  # noqa: F401  (the DagBag process has it loaded already)

    before = set(sys.modules)
    t0 = time.perf_counter()
    spec = importlib.util.spec_from_file_location("dag_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seconds = time.perf_counter() - t0
    new = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in HEAVY and m not in PARSE_TIME)
    return {"heavy_imports": new, "seconds": seconds}


def run(dag_id: str) -> dict:
    from airflow.models.dagbag import DagBag

    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    dr = bag.get_dag(dag_id).test()
    from airflow.models.taskinstance import TaskInstance as TI
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TI).filter(TI.dag_id == dag_id, TI.run_id == dr.run_id).all()
        states = {f"{ti.task_id}[{ti.map_index}]" if ti.map_index >= 0 else ti.task_id: str(ti.state) for ti in tis}
        labels = {f"{ti.task_id}[{ti.map_index}]": ti.rendered_map_index for ti in tis if ti.map_index >= 0}
        xcoms = session.query(XComModel).filter(XComModel.dag_id == dag_id, XComModel.run_id == dr.run_id,
                                                XComModel.key == "return_value").all()
        returned = {x.task_id: x.value for x in xcoms if x.map_index < 0}
        from airflow.models.asset import AssetEvent, AssetModel

        events = [{"asset": name, "task": e.source_task_id, "extra": e.extra}
                  for e, name in session.query(AssetEvent, AssetModel.name)
                  .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                  .filter(AssetEvent.source_dag_id == dag_id, AssetEvent.source_run_id == dr.run_id)]
    return {"state": str(dr.state), "tasks": states, "labels": labels, "returned": returned,
            "asset_events": events}


def providers() -> dict:
    """What the UI's connection list and form are built from (Airflow's ProvidersManager and the
    API's hook metadata service)."""
    from airflow.providers_manager import ProvidersManager

    pm = ProvidersManager()
    hooks = {t: {"hook_class_name": h.hook_class_name, "conn_id_attr": h.connection_id_attribute_name,
                 "hook_name": h.hook_name, "package": h.package_name, "testable": h.connection_testable}
             for t, h in pm.hooks.items() if h is not None and t.startswith("labsync")}
    from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService

    meta = {m.connection_type: json.loads(m.model_dump_json()) for m in HookMetaService.hook_meta_data()
            if m.connection_type and m.connection_type.startswith("labsync")}
    return {"providers": sorted(p for p in pm.providers if "labsync" in p), "hooks": hooks, "ui": meta}


def testconn(spec: str) -> list[dict]:
    """As the API's POST /connections/test does, for each Connection of the JSON list: the
    Connection under a transient id in the environment, then Connection.test_connection()
    (which builds the Hook of its type and calls its test_connection())."""
    from airflow.models.connection import Connection

    results = []
    for i, fields in enumerate(json.loads(spec)):
        conn = Connection(conn_id=f"labsync_probe_{i}", **fields)
        os.environ[f"AIRFLOW_CONN_LABSYNC_PROBE_{i}"] = conn.as_json()
        ok, message = conn.test_connection()
        del os.environ[f"AIRFLOW_CONN_LABSYNC_PROBE_{i}"]
        results.append({"ok": ok, "message": message})
    return results


if __name__ == "__main__":
    what = sys.argv[1]
    result = {"integrity": lambda: integrity(), "imports": lambda: imports(sys.argv[2]),
              "test": lambda: run(sys.argv[2]), "providers": providers,
              "testconn": lambda: testconn(sys.argv[2])}[what]()
    print("PROBE " + json.dumps(result))
