"""How long each DAG file takes to import, as the DAG processor sees it (airflow.sdk already
loaded), measured in a fresh process per file and repeated. Goal: <= 0.5 s per file.
Also prints the cost of importing airflow.sdk itself, the baseline every DAG file shares.
Usage: python bench/dag_import.py [REPEATS]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROBE = r"""
import importlib.util, json, sys, time
t0 = time.perf_counter()
import airflow.sdk
sdk = time.perf_counter() - t0
t0 = time.perf_counter()
spec = importlib.util.spec_from_file_location("dag_file", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
print(json.dumps({"sdk": sdk, "dag": time.perf_counter() - t0}))
"""


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "AIRFLOW_HOME": home, "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
               "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "PYTHONPATH": str(REPO)}
        for dag_file in sorted((REPO / "dags").glob("*.py")):
            runs = []
            for _ in range(repeats):
                out = subprocess.run([sys.executable, "-c", PROBE, str(dag_file)], env=env,
                                     capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            dag = statistics.median(r["dag"] for r in runs)
            sdk = statistics.median(r["sdk"] for r in runs)
            verdict = "ok" if dag <= 0.5 else "over the 0.5 s goal"
            print(f"{dag_file.name:20s} import {dag * 1000:7.1f} ms (median of {repeats}; goal <= 500 ms: {verdict})"
                  f"   [airflow.sdk itself: {sdk:.2f} s, {dag / sdk:.3f}x of it]")


if __name__ == "__main__":
    main()
