"""Run inside a subprocess whose environment points AIRFLOW_HOME at a migrated temp home.

    python -m tests.airflow_probe integrity        -> JSON facts about the DagBag
    python -m tests.airflow_probe imports FILE      -> JSON: which heavy modules a DAG file imported
    python -m tests.airflow_probe test DAG_ID       -> runs dag.test(), JSON: run and task states
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

HEAVY = ("pandas", "pandera", "pyarrow", "sqlalchemy", "httpx", "etl")


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
    new = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in HEAVY)
    return {"heavy_imports": new, "seconds": seconds}


def run(dag_id: str) -> dict:
    from airflow.models.dagbag import DagBag

    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    dr = bag.get_dag(dag_id).test()
    from airflow.models.taskinstance import TaskInstance as TI
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TI).filter(TI.dag_id == dag_id, TI.run_id == dr.run_id).all()
        states = {f"{ti.task_id}[{ti.map_index}]" if ti.map_index >= 0 else ti.task_id: str(ti.state) for ti in tis}
    return {"state": str(dr.state), "tasks": states}


if __name__ == "__main__":
    what = sys.argv[1]
    result = {"integrity": lambda: integrity(), "imports": lambda: imports(sys.argv[2]),
              "test": lambda: run(sys.argv[2])}[what]()
    print("PROBE " + json.dumps(result))
