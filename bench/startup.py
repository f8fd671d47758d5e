"""Start-up: how long short commands and DAG parsing take, whole process, against the floor.

Each figure is the median wall time of fresh processes (interpreter start, imports, work):
- `python -c pass`                          the interpreter alone
- `labsync --help`
- `labsync validate` of a 10-row file       with `--no-record`, and recording into a SQLite
                                            warehouse that is already migrated
- each DAG file in `dags/`                  `import airflow.sdk` + executing the file, as the DAG
                                            processor does, against a minimal TaskFlow DAG
- `import alembic.command`                  what Alembic costs a command that does not migrate

It also lists which heavy libraries `labsync --help` imports (goal: none of pandas, pandera,
pyarrow, alembic, sqlalchemy) and whether the environment has compiled bytecode.

    .venv/bin/python bench/startup.py [--repeat 7]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("pandas", "pandera", "pyarrow", "numpy", "alembic", "sqlalchemy", "rich", "httpx")

MINIMAL_DAG = '''
from datetime import datetime

from airflow.sdk import dag, task


@dag(schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
def minimal():
    @task
    def hello() -> int:
        return 1

    hello()


minimal()
'''

PARSE = r"""
import importlib.util, sys
import airflow.sdk
spec = importlib.util.spec_from_file_location("dag_file", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
"""

HELP_IMPORTS = r"""
import contextlib, io, json, sys
from etl.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    main(["--help"])
print(json.dumps([m for m in sys.argv[1:] if m in sys.modules]))
"""


def wall(cmd: list[str], env: dict, repeat: int, ok: tuple[int, ...] = (0,)) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        times.append(time.perf_counter() - t0)
        if proc.returncode not in ok:
            raise SystemExit(f"{' '.join(cmd[:4])} exited {proc.returncode}: {proc.stderr.decode()[-400:]}")
    return statistics.median(times)


def bytecode_share() -> str:
    """How many of site-packages' modules have a compiled .pyc next to them."""
    site = Path(sysconfig.get_paths()["purelib"])
    sources = pycs = 0
    for src in site.rglob("*.py"):
        sources += 1
        tag = sys.implementation.cache_tag
        pycs += (src.parent / "__pycache__" / f"{src.stem}.{tag}.pyc").exists()
    return f"{pycs:,} of {sources:,} modules in site-packages have bytecode"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    py = sys.executable
    labsync = [py, "-m", "etl.cli"]
    prefix = os.environ.get("PYTHONPYCACHEPREFIX")
    print(f"{bytecode_share()}; PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r}"
          + (f"; PYTHONPYCACHEPREFIX={prefix!r} (bytecode looked for there instead)" if prefix else ""))
    with tempfile.TemporaryDirectory(prefix="labsync-bench-") as tmp:
        tmpdir = Path(tmp)
        env = {**os.environ, "LABSYNC_WAREHOUSE_URL": f"sqlite:///{tmpdir / 'w.db'}",
               "AIRFLOW_HOME": str(tmpdir / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
               "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "PYTHONPATH": str(REPO)}
        batch = tmpdir / "ten.csv"
        shutil.copy(REPO / "examples" / "orders.csv", batch)
        subprocess.run([*labsync, "db", "upgrade"], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
        minimal = tmpdir / "minimal_dag.py"
        minimal.write_text(MINIMAL_DAG)

        floor = wall([py, "-c", "pass"], env, args.repeat)
        rows = [("python -c pass", floor)]
        rows.append(("labsync --help", wall([*labsync, "--help"], env, args.repeat)))
        rows.append(("labsync validate (10 rows, --no-record)",
                     wall([*labsync, "validate", str(batch), "--no-record"], env, args.repeat)))
        rows.append(("labsync validate (10 rows, recorded)",
                     wall([*labsync, "validate", str(batch)], env, args.repeat)))
        sdk = wall([py, "-c", "import airflow.sdk"], env, args.repeat)
        rows.append(("import airflow.sdk", sdk))
        base_dag = wall([py, "-c", PARSE, str(minimal)], env, args.repeat)
        rows.append(("minimal TaskFlow DAG parse", base_dag))
        dags = [(f"dags/{f.name} parse", wall([py, "-c", PARSE, str(f)], env, args.repeat))
                for f in sorted((REPO / "dags").glob("*.py"))]
        rows.extend(dags)
        alembic = wall([py, "-c", "import alembic.command, alembic.config"], env, args.repeat)
        rows.append(("import alembic.command", alembic))
        sqla = wall([py, "-c", "import sqlalchemy"], env, args.repeat)
        rows.append(("import sqlalchemy", sqla))

        print(f"whole-process wall time, median of {args.repeat}:")
        for name, seconds in rows:
            print(f"  {name:<42} {seconds * 1000:7.0f} ms   {seconds / floor:5.1f}x python -c pass")
        for name, seconds in dags:
            print(f"  {name:<42} {seconds / base_dag:5.2f}x the minimal TaskFlow DAG")
        print(f"  Alembic costs a command that imports it ~{(alembic - sqla) * 1000:.0f} ms "
              "beyond SQLAlchemy")
        out = subprocess.run([py, "-c", HELP_IMPORTS, *HEAVY], cwd=REPO, env=env, check=True,
                             capture_output=True, text=True).stdout
        heavy = json.loads(out.strip().splitlines()[-1])
        print(f"  labsync --help imports: {', '.join(heavy) if heavy else 'none of ' + ', '.join(HEAVY)}")


if __name__ == "__main__":
    main()
