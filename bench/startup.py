"""Start-up: how long short commands and DAG parsing take, whole process, against the floor.

Each figure is the median wall time of fresh processes (interpreter start, imports, work):
- `python -c pass`                          the interpreter alone
- `labsync --help`
- `labsync validate` of a 10-row file       with `--no-record`, and recording into a SQLite
                                            warehouse that is already migrated
- each DAG file in `dags/`                  `import airflow.sdk` + executing the file, as the DAG
                                            processor does, against a minimal TaskFlow DAG
- `import alembic.command`                  what Alembic costs a command that does not migrate

It also prints `labsync --help` against `python -c pass` (goal: at most 5x, the two run in
turn and compared pair by pair), lists which heavy libraries `labsync --help` imports (goal: none
of them) and whether the environment has compiled bytecode.

As a deployment runs (scripts/bootstrap-venv.sh): `labsync` is the console script beside the
interpreter (`python -m etl.cli` where there is none), etl/ and schemas/ are byte-compiled first,
and the processes run without PYTHONDONTWRITEBYTECODE, so what they import is read from, or
written to, __pycache__ (one warm-up run each, not counted).

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
HEAVY = ("pandas", "pandera", "pyarrow", "numpy", "alembic", "sqlalchemy", "rich", "httpx", "pydantic",
         "fsspec", "cryptography", "jinja2", "tenacity")
HELP_GOAL = 5.0  # `labsync --help` at most this many times `python -c pass`

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


def _once(cmd: list[str], env: dict, ok: tuple[int, ...] = (0,)) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - t0
    if proc.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd[:4])} exited {proc.returncode}: {proc.stderr.decode()[-400:]}")
    return seconds


def wall(cmd: list[str], env: dict, repeat: int, ok: tuple[int, ...] = (0,)) -> float:
    _once(cmd, env, ok)  # warm-up: bytecode written, files in the page cache
    return statistics.median(_once(cmd, env, ok) for _ in range(repeat))


def paired(a: list[str], b: list[str], env: dict, repeat: int) -> tuple[float, float, float]:
    """(median of a, median of b, median of the ratios a/b), a and b run in turn: a drift in the
    machine's speed moves both sides of each ratio alike."""
    _once(a, env), _once(b, env)
    pairs = [(_once(a, env), _once(b, env)) for _ in range(repeat)]
    return (statistics.median(x for x, _ in pairs), statistics.median(y for _, y in pairs),
            statistics.median(x / y for x, y in pairs))


def labsync_command(py: str) -> list[str]:
    """The console script pip wrote beside the interpreter (what a user runs), else `-m etl.cli`."""
    script = Path(py).parent / ("labsync.exe" if os.name == "nt" else "labsync")
    return [str(script)] if script.is_file() else [py, "-m", "etl.cli"]


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
    labsync = labsync_command(py)
    prefix = os.environ.get("PYTHONPYCACHEPREFIX")
    subprocess.run([py, "-m", "compileall", "-q", "etl", "schemas"], cwd=REPO, check=True,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"})
    print(f"{bytecode_share()}; PYTHONDONTWRITEBYTECODE unset for the measured processes "
          f"(here: {os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r})"
          + (f"; PYTHONPYCACHEPREFIX={prefix!r} (bytecode looked for there instead)" if prefix else ""))
    print(f"labsync = {' '.join(labsync)}")
    with tempfile.TemporaryDirectory(prefix="labsync-bench-") as tmp:
        tmpdir = Path(tmp)
        env = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
               "LABSYNC_WAREHOUSE_URL": f"sqlite:///{tmpdir / 'w.db'}",
               "AIRFLOW_HOME": str(tmpdir / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
               "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "PYTHONPATH": str(REPO)}
        batch = tmpdir / "ten.csv"
        shutil.copy(REPO / "examples" / "orders.csv", batch)
        subprocess.run([*labsync, "db", "upgrade"], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
        minimal = tmpdir / "minimal_dag.py"
        minimal.write_text(MINIMAL_DAG)

        help_wall, floor, help_ratio = paired([*labsync, "--help"], [py, "-c", "pass"], env, args.repeat)
        rows = [("python -c pass", floor)]
        rows.append(("labsync --help", help_wall))
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
        print(f"  labsync --help / python -c pass: {help_ratio:.1f}x (median of {args.repeat} pairs run in "
              f"turn; goal at most {HELP_GOAL:g}x: {'met' if help_ratio <= HELP_GOAL else 'NOT met'})")
        print(f"  Alembic costs a command that imports it ~{(alembic - sqla) * 1000:.0f} ms "
              "beyond SQLAlchemy")
        out = subprocess.run([py, "-c", HELP_IMPORTS, *HEAVY], cwd=REPO, env=env, check=True,
                             capture_output=True, text=True).stdout
        heavy = json.loads(out.strip().splitlines()[-1])
        print(f"  labsync --help imports: {', '.join(heavy) if heavy else 'none of ' + ', '.join(HEAVY)}")


if __name__ == "__main__":
    main()
