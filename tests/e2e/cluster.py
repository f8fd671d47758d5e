"""A real Airflow CeleryExecutor cluster on loopback, started from nothing, for `make e2e`.

    PostgreSQL (tests/pgserver.py)   two databases: Airflow's metadata DB and the labsync warehouse
    redis-server (Debian)            the Celery broker, no persistence
    labsync sandbox                  the LetsGetChecked and Rupa APIs
    airflow api-server               the UI/REST API and the execution API the workers talk to
    airflow dag-processor            parses dags/ into the metadata DB
    airflow scheduler                creates runs, queues task instances to Celery, finds dead ones
    airflow celery worker  x2        worker1@<host>, worker2@<host>

Every Airflow process gets its own directory as working directory, HOME, TMPDIR and
AIRFLOW_HOME (its own logs, its own config): nothing on disk is shared between them, as on
separate machines. What they share is what a real deployment shares: the code (dags/, the
package), the metadata DB, the broker, the warehouse, the vendors, and the inbox:

    inbox_kind="s3"      a bucket on moto's S3-compatible server (`moto_server`, moto[server]),
                         reached with the standard AWS_* variables: no folder shared at all
    inbox_kind="local"   a folder every worker sees (the only shared folder), for a checkout
                         whose labsync has no object-storage inbox (etl/intake/storage.py) yet

LABSYNC_E2E_INBOX picks one; by default s3 when labsync and moto can do it, else local.

Each worker records its task instances under its own name (tests/e2e/hostname.py), so the
metadata DB says which worker ran what. `kill_worker` SIGKILLs a worker's whole process tree
(the Celery parent, its pool, the task supervisors and the task processes) at once: a machine
that died, not a worker that was asked to stop.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import sqlalchemy as sa

from tests.pgserver import PgServer, _free_port, create_database

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DAG_ID = "order_batches"


class ClusterError(RuntimeError):
    """A component did not come up or a wait ran out; the message names the log to read."""


def wait_until(what: str, predicate: Callable[[], object], timeout: float, interval: float = 0.5,
               logs: Sequence[Path] = ()) -> object:
    """Poll `predicate` until it returns something truthy; raise naming `what` and the logs."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            tails = "".join(f"\n--- {p} (last lines)\n{_tail(p)}" for p in logs)
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}{tails}")
        time.sleep(interval)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    home: Path

    def alive(self) -> bool:
        return self.popen.poll() is None


S3_BUCKET = "labsync-e2e"
S3_ENV = {"AWS_ACCESS_KEY_ID": "labsync-e2e", "AWS_SECRET_ACCESS_KEY": "labsync-e2e-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}


def default_inbox_kind() -> str:
    """s3 when this labsync has the object-storage inbox and moto's server and s3fs are
    installed; local otherwise. LABSYNC_E2E_INBOX=s3|local decides instead."""
    chosen = os.environ.get("LABSYNC_E2E_INBOX", "").strip().lower()
    if chosen:
        return chosen
    can_s3 = all(importlib.util.find_spec(m) is not None for m in ("etl.intake.storage", "moto", "s3fs"))
    return "s3" if can_s3 else "local"


class Cluster:
    def __init__(self, root: Path, *, inbox_kind: str | None = None, workers: int = 2,
                 worker_concurrency: int = 2, chunk_rows: int = 40) -> None:
        inbox_kind = inbox_kind or default_inbox_kind()
        if inbox_kind not in ("s3", "local"):
            raise ClusterError(f"LABSYNC_E2E_INBOX must be s3 or local, not {inbox_kind!r}")
        self.root = root
        self.inbox_kind = inbox_kind
        self.n_workers = workers
        self.worker_concurrency = worker_concurrency
        self.chunk_rows = chunk_rows
        self.procs: dict[str, Proc] = {}
        self.pg: PgServer | None = None
        self.s3_env: dict[str, str] = {}
        self.inbox_url = str(root / "inbox") if inbox_kind == "local" else f"s3://{S3_BUCKET}/inbox"
        self.hostname = socket.gethostname()  # as tests/e2e/hostname.py names the workers

    # ---- start / stop ---------------------------------------------------------------------
    def start(self) -> Cluster:
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        self.pg = PgServer().start()
        self.meta_url = create_database(self.pg.admin_url)
        self.warehouse_url = create_database(self.pg.admin_url)
        self.redis_port, self.sandbox_port, self.api_port = _free_port(), _free_port(), _free_port()
        self.sandbox_url = f"http://127.0.0.1:{self.sandbox_port}"
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self._start_redis()
        self._start_sandbox()
        self._start_inbox()
        self.common = self._common_env()

        control = self._home("control")
        self.run(["labsync", "db", "upgrade"], home=control)
        self.run(["airflow", "db", "migrate"], home=control, timeout=600)
        slots = self.run(["labsync", "budget", "--pool-slots"], home=control).strip()
        self.run(["airflow", "pools", "set", "lgc_api", slots, "LetsGetChecked API slots"], home=control)
        # the LetsGetChecked connection as a deployment creates it (tasks read it through the
        # execution API; LGC_BASE_URL is deliberately not set on the workers)
        from etl.settings import (
            SANDBOX_LGC_ACCESS_KEY,
            SANDBOX_LGC_CLIENT_ID,
            SANDBOX_LGC_SECRET_KEY,
        )

        self.run(["airflow", "connections", "add", "lgc_default", "--conn-type", "labsync-lgc",
                  "--conn-host", f"{self.sandbox_url}/lgc", "--conn-login", SANDBOX_LGC_ACCESS_KEY,
                  "--conn-password", SANDBOX_LGC_SECRET_KEY,
                  "--conn-extra", f'{{"client_id": "{SANDBOX_LGC_CLIENT_ID}"}}'], home=control)

        self.spawn("api-server", ["airflow", "api-server", "-H", "127.0.0.1", "-p", str(self.api_port)])
        self.spawn("dag-processor", ["airflow", "dag-processor"])
        self.spawn("scheduler", ["airflow", "scheduler", "--skip-serve-logs"])
        for i in range(1, self.n_workers + 1):
            self.spawn(f"worker{i}", ["airflow", "celery", "worker", "--celery-hostname", f"worker{i}@%h",
                                      "--concurrency", str(self.worker_concurrency), "--skip-serve-logs",
                                      "--without-gossip", "--without-mingle"],
                       extra={"LABSYNC_E2E_WORKER": f"worker{i}",
                              "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.e2e.hostname.worker_hostname"})
        self._wait_ready()
        return self

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            self._kill_tree(proc, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self._kill_tree(proc, signal.SIGKILL)
        if self.pg is not None:
            self.pg.stop()
            self.pg = None

    def __enter__(self) -> Cluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- the pieces -----------------------------------------------------------------------
    def _home(self, name: str) -> Path:
        home = self.root / name
        for sub in ("", "tmp", "airflow"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        return home

    def _env(self, home: Path, extra: dict | None = None) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AIRFLOW", "LABSYNC_", "LGC_", "RUPA_"))}
        env.update(self.common)
        env.update(HOME=str(home), TMPDIR=str(home / "tmp"), AIRFLOW_HOME=str(home / "airflow"),
                   PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}")
        env.update(extra or {})
        return env

    def _common_env(self) -> dict:
        from cryptography.fernet import Fernet

        return {
            "PYTHONPATH": str(REPO),  # tests.e2e.hostname, the workers' hostname callable
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.meta_url,
            # Airflow's async engine would pick asyncpg for postgresql://; psycopg 3 does both
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": self.meta_url,
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"redis://127.0.0.1:{self.redis_port}/1",
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__BASE_URL": self.api_url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            # runs come from `airflow dags trigger` only: the test decides when a batch runs
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            # a worker that died is noticed in seconds, not the default five minutes
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "3",
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "3",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
            # labsync's own settings, on every component (LABSYNC_FERNET_KEY on every worker)
            "LABSYNC_WAREHOUSE_URL": self.warehouse_url,
            **self.s3_env,
            "LABSYNC_INBOX": self.inbox_url,
            "LABSYNC_INBOX_SETTLE_SECONDS": "0",
            "LABSYNC_CHUNK_ROWS": str(self.chunk_rows),
            "LABSYNC_FERNET_KEY": Fernet.generate_key().decode(),
        }

    def _start_redis(self) -> None:
        home = self._home("redis")
        log = home / "redis.log"
        redis = shutil.which("redis-server") or "/usr/bin/redis-server"
        popen = subprocess.Popen(
            [redis, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(home), "--logfile", str(log)],
            cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs["redis"] = Proc("redis", popen, log, home)

        def up() -> bool:
            import redis as redis_client

            try:
                return bool(redis_client.Redis(port=self.redis_port, socket_timeout=1).ping())
            except Exception:
                return False

        wait_until("redis-server", up, 30, 0.2, [log])

    def _start_sandbox(self) -> None:
        home = self._home("sandbox")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LABSYNC_", "LGC_", "RUPA_"))}
        log = home / "sandbox.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen([str(BIN / "labsync"), "sandbox", "--port", str(self.sandbox_port)],
                                     cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.procs["sandbox"] = Proc("sandbox", popen, log, home)
        wait_until("the sandbox APIs", lambda: self._get_ok(f"{self.sandbox_url}/_sandbox/health"), 60, 0.2, [log])

    def _start_inbox(self) -> None:
        if self.inbox_kind == "local":
            Path(self.inbox_url).mkdir(parents=True)
            return
        home = self._home("s3")
        port = _free_port()
        log = home / "s3.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with open(log, "wb") as out:
            popen = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                     cwd=home, env={**env, "HOME": str(home), "TMPDIR": str(home / "tmp")},
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs["s3"] = Proc("s3", popen, log, home)
        endpoint = f"http://127.0.0.1:{port}"
        wait_until("the S3-compatible server (moto_server)",
                   lambda: self._get_ok(f"{endpoint}/moto-api/") or self._get_ok(endpoint), 60, 0.3, [log])
        self.s3_env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
        self.inbox_fs().mkdir(S3_BUCKET)  # the bucket exists before the deployment: labsync never creates one

    def inbox_fs(self):
        """The inbox's filesystem (fsspec), as the test (a program manager's upload tool) sees it."""
        import fsspec

        if self.inbox_kind == "local":
            return fsspec.filesystem("file")
        return fsspec.filesystem("s3", key=self.s3_env["AWS_ACCESS_KEY_ID"],
                                 secret=self.s3_env["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True,
                                 # no region_name: s3fs would send it as the new bucket's
                                 # LocationConstraint, which us-east-1 refuses
                                 client_kwargs={"endpoint_url": self.s3_env["AWS_ENDPOINT_URL"]})

    def inbox_names(self, sub: str = "") -> list[str]:
        """The names of the files directly in the inbox (or its `sub` folder), fresh."""
        fs = self.inbox_fs()
        path = f"{self.inbox_url}/{sub}".rstrip("/")
        fs.invalidate_cache()
        if not fs.exists(path):
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=True)
                      if e["type"] == "file")

    def drop(self, local: Path, name: str) -> None:
        """Upload a file into the inbox, as a program manager's upload lands: whole."""
        self.inbox_fs().put_file(str(local), f"{self.inbox_url}/{name}")

    def read_inbox(self, relative: str) -> bytes:
        return self.inbox_fs().cat_file(f"{self.inbox_url}/{relative}")

    def spawn(self, name: str, cmd: list[str], extra: dict | None = None) -> Proc:
        home = self._home(name)
        log = home / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], cwd=home, env=self._env(home, extra),
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        proc = Proc(name, popen, log, home)
        self.procs[name] = proc
        return proc

    def run(self, cmd: list[str], *, home: Path | None = None, timeout: float = 300) -> str:
        """Run a one-off command (airflow/labsync CLI) as an operator would, from the control dir."""
        home = home or self._home("control")
        done = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], cwd=home, env=self._env(home),
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise ClusterError(f"`{' '.join(cmd[:3])} ...` exited {done.returncode}:\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done.stdout

    def _get_ok(self, url: str) -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _wait_ready(self) -> None:
        logs = [p.log for p in self.procs.values()]

        def all_alive() -> None:
            for p in self.procs.values():
                if not p.alive():
                    raise ClusterError(f"{p.name} exited ({p.popen.returncode}); {p.log}:\n{_tail(p.log, 60)}")

        def api() -> bool:
            all_alive()
            return self._get_ok(f"{self.api_url}/api/v2/monitor/health")

        wait_until("the api-server", api, 240, 1, logs)

        def parsed() -> bool:
            all_alive()
            with self.meta() as conn:
                return conn.execute(sa.text("select count(*) from dag where dag_id = :d"), {"d": DAG_ID}).scalar() == 1

        wait_until(f"the dag-processor to parse {DAG_ID}", parsed, 240, 1, logs)

        def workers() -> bool:
            all_alive()
            return all("ready." in _tail(self.procs[f"worker{i}"].log, 200)
                       for i in range(1, self.n_workers + 1))

        wait_until("both Celery workers", workers, 240, 1, logs)

    # ---- what tests use -------------------------------------------------------------------
    def meta(self) -> sa.Connection:
        if not hasattr(self, "_meta_engine"):
            self._meta_engine = sa.create_engine(self.meta_url, poolclass=sa.pool.NullPool)
        return self._meta_engine.connect()

    def warehouse(self) -> sa.Engine:
        if not hasattr(self, "_warehouse_engine"):
            self._warehouse_engine = sa.create_engine(self.warehouse_url, poolclass=sa.pool.NullPool)
        return self._warehouse_engine

    def trigger(self, run_id: str) -> None:
        self.run(["airflow", "dags", "unpause", DAG_ID])
        self.run(["airflow", "dags", "trigger", DAG_ID, "--run-id", run_id])

    def run_state(self, run_id: str) -> str | None:
        with self.meta() as conn:
            return conn.execute(sa.text("select state from dag_run where dag_id = :d and run_id = :r"),
                                {"d": DAG_ID, "r": run_id}).scalar()

    def wait_run(self, run_id: str, timeout: float = 240) -> str:
        def done() -> str | None:
            for p in self.procs.values():
                if not p.alive() and p.name not in self.killed:
                    raise ClusterError(f"{p.name} exited ({p.popen.returncode}); {p.log}:\n{_tail(p.log, 60)}")
            state = self.run_state(run_id)
            return state if state in ("success", "failed") else None

        return wait_until(f"DAG run {run_id} to finish", done, timeout, 1,
                          [p.log for p in self.procs.values()])

    def task_instances(self, run_id: str) -> list[sa.Row]:
        with self.meta() as conn:
            return conn.execute(sa.text(
                "select task_id, map_index, state, try_number, hostname from task_instance "
                "where dag_id = :d and run_id = :r order by task_id, map_index"),
                {"d": DAG_ID, "r": run_id}).all()

    def tries(self, task_id: str, run_id: str | None = None) -> list[sa.Row]:
        """Every try of `task_id` that started on a worker: earlier tries (task_instance_history)
        and the latest (task_instance), with the worker each ran on."""
        where = "dag_id = :d and task_id = :t and hostname is not null and hostname != ''"
        args = {"d": DAG_ID, "t": task_id}
        if run_id:
            where += " and run_id = :r"
            args["r"] = run_id
        with self.meta() as conn:
            return conn.execute(sa.text(
                f"select run_id, map_index, try_number, state, hostname from task_instance where {where} "
                f"union all select run_id, map_index, try_number, state, hostname "
                f"from task_instance_history where {where}"), args).all()

    def worker_names(self) -> list[str]:
        """The hostnames the workers' task instances record (tests/e2e/hostname.py)."""
        return [f"worker{i}@{self.hostname}" for i in range(1, self.n_workers + 1)]

    def xcom(self, run_id: str, task_id: str):
        """A task's return value (None until it has one), as the metadata DB holds it."""
        with self.meta() as conn:
            value = conn.execute(sa.text(
                "select value from xcom where dag_id = :d and run_id = :r and task_id = :t "
                "and key = 'return_value' and map_index = -1"),
                {"d": DAG_ID, "r": run_id, "t": task_id}).scalar()
        return json.loads(value) if isinstance(value, str | bytes) else value

    killed: tuple[str, ...] = ()

    def kill_worker(self, name: str) -> int:
        """SIGKILL the worker's whole process tree at once (the machine died). Returns how many
        processes were killed."""
        proc = self.procs[name]
        n = self._kill_tree(proc, signal.SIGKILL)
        proc.popen.wait(timeout=10)
        self.killed = (*self.killed, name)
        return n

    @staticmethod
    def _kill_tree(proc: Proc, sig: int) -> int:
        try:
            parent = psutil.Process(proc.popen.pid)
            victims = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            victims = []
        # the session started for the process catches what re-parented itself away
        try:
            os.killpg(proc.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for victim in victims:
            try:
                victim.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        return len(victims)

    def sandbox_get(self, path: str) -> dict:
        return httpx.get(f"{self.sandbox_url}{path}", timeout=10).raise_for_status().json()

    def sandbox_post(self, path: str, body: dict) -> dict:
        return httpx.post(f"{self.sandbox_url}{path}", json=body, timeout=10).raise_for_status().json()

    def task_log(self, run_id: str, task_id: str, try_number: int = 1) -> str:
        """A task's log, read from the disk of the worker that ran it (each worker keeps its own)."""
        found = []
        for i in range(1, self.n_workers + 1):
            base = self.root / f"worker{i}" / "airflow" / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / f"task_id={task_id}"
            found += sorted(base.glob(f"attempt={try_number}.log"))
        return "\n".join(p.read_text(errors="replace") for p in found)
