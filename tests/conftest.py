"""Shared fixtures.

- `warehouse_url`: parametrised over a fresh SQLite file and a fresh database on a real PostgreSQL
  server (tests/pgserver.py starts one per test session, or LABSYNC_TEST_POSTGRES_URL points at one).
- `engine`: that warehouse (migrated once by `warehouse_url`, as `labsync db upgrade` would).
- `sandbox`: both sandbox APIs served on 127.0.0.1 in a background thread (fresh per test).
- `settings`: Settings pointing at the sandbox and the warehouse, with fast retries and a
  Fernet key for the stored tokens (a server warehouse has no key file).
- `lite_engine`, `lite_settings`: the same on a SQLite file only, for tests about files and HTTP
  answers rather than about the warehouse (they run once instead of once per database).
- `inbox_location`: parametrised over a local folder and a fresh prefix of a bucket on a real
  S3-compatible server (`s3_server`: moto's standalone server on loopback, one per session,
  tests/s3server.py); inbox tests take it so each passes on both alike.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from etl.settings import RetrySettings, Settings
from tests.pgserver import PgServer, create_database

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def pg_admin_url():
    url = os.environ.get("LABSYNC_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    server = PgServer().start()
    try:
        yield server.admin_url
    finally:
        server.stop()


def migrated(url: str) -> str:
    """The warehouse at `url`, upgraded once, as a deployment does with `labsync db upgrade`."""
    from etl import warehouse

    warehouse.upgrade_url(url).dispose()
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def warehouse_url(request, tmp_path):
    if request.param == "sqlite":
        return migrated(f"sqlite:///{tmp_path / 'warehouse.db'}")
    return migrated(create_database(request.getfixturevalue("pg_admin_url")))


@pytest.fixture
def engine(warehouse_url):
    from etl import warehouse

    eng = warehouse.connect(warehouse_url)
    yield eng
    eng.dispose()


@pytest.fixture
def sandbox():
    from etl.sandbox.server import SandboxServer

    with SandboxServer() as server:
        yield server


FAST_RETRY = RetrySettings(max_attempts=5, initial_wait=0.01, max_wait=0.05, timeout=5.0)
TEST_FERNET_KEY = "m0QzYcYlMbd3KQ5V4mVjzk9XqgL0nL0yS4t8f3m4VqE="  # tests only; never a real key


@pytest.fixture
def settings(warehouse_url, sandbox, tmp_path):
    base = Settings()
    return replace(
        base,
        warehouse_url=warehouse_url,
        inbox=tmp_path / "inbox",
        lgc=replace(base.lgc, base_url=sandbox.lgc_url),
        rupa=replace(base.rupa, base_url=sandbox.rupa_url),
        retry=FAST_RETRY,
        fernet_key=TEST_FERNET_KEY,
    )


@pytest.fixture
def lite_engine(tmp_path):
    from etl import warehouse

    eng = warehouse.connect(migrated(f"sqlite:///{tmp_path / 'lite.db'}"))
    yield eng
    eng.dispose()


@pytest.fixture
def lite_settings(lite_engine, sandbox, tmp_path):
    base = Settings()
    return replace(
        base,
        warehouse_url=lite_engine.url.render_as_string(hide_password=False),
        inbox=tmp_path / "inbox",
        lgc=replace(base.lgc, base_url=sandbox.lgc_url),
        rupa=replace(base.rupa, base_url=sandbox.rupa_url),
        retry=FAST_RETRY,
        fernet_key=TEST_FERNET_KEY,
    )


@pytest.fixture(scope="session")
def s3_server():
    from tests.s3server import S3Server

    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(params=["local", "s3"])
def inbox_location(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "inbox")
    return request.getfixturevalue("s3_server").new_inbox()


# Rupa Checkout fixtures (`rupa`: sandbox authorized + extracted; `receiver`: the webhook receiver
# the sandbox sends its events to)
from tests.checkout_fixtures import receiver, rupa  # noqa: E402, F401
