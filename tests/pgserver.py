"""A throwaway PostgreSQL server for the test session: Debian's binaries, a cluster in a temp
dir, a free loopback port. Root cannot run postgres, so as root the cluster runs as `postgres`.
Set LABSYNC_TEST_POSTGRES_URL to use an existing server instead."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid


def _bindir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        raise RuntimeError(
            "PostgreSQL server binaries not found; run `make test` (it installs Debian's postgresql)"
        )
    return os.path.dirname(found[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    def __init__(self) -> None:
        self.bindir = _bindir()
        self.root = tempfile.mkdtemp(prefix="labsync-pg-")
        self.datadir = os.path.join(self.root, "data")
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
            os.chmod(self.root, 0o755)

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> PgServer:
        self._run(f"{self.bindir}/initdb", "-D", self.datadir, "-U", "labsync", "-A", "trust", "-E", "UTF8", "--no-sync")
        self.resume()
        return self

    def pause(self) -> None:
        """Stop the server, keeping its data (the warehouse going away)."""
        self._run(f"{self.bindir}/pg_ctl", "-D", self.datadir, "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run(f"{self.bindir}/pg_ctl", "-D", self.datadir, "-o", opts, "-l", os.path.join(self.root, "log"), "-w", "start")

    def stop(self) -> None:
        try:
            self._run(f"{self.bindir}/pg_ctl", "-D", self.datadir, "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://labsync@127.0.0.1:{self.port}/postgres"

    def url_for(self, dbname: str) -> str:
        return f"postgresql+psycopg://labsync@127.0.0.1:{self.port}/{dbname}"


def create_database(admin_url: str) -> str:
    """Create a fresh database on the server behind admin_url; return its URL."""
    import sqlalchemy as sa

    name = "t_" + uuid.uuid4().hex[:12]
    eng = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with eng.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        eng.dispose()
    return admin_url.rsplit("/", 1)[0] + "/" + name


def drop_database(url: str) -> None:
    """Drop a database that create_database made (nobody may be connected to it)."""
    import sqlalchemy as sa

    admin, name = url.rsplit("/", 1)
    eng = sa.create_engine(admin + "/postgres", isolation_level="AUTOCOMMIT")
    try:
        with eng.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
    finally:
        eng.dispose()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
