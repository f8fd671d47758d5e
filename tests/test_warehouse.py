"""The warehouse: migrations create every table on SQLite and PostgreSQL, re-running is a no-op,
and the dialect-aware upsert inserts then updates."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from etl import warehouse
from etl.errors import ConfigError
from etl.warehouse import rupa_lab_tests, upsert
from etl.warehouse.tables import metadata


def test_migrations_create_every_table_and_rerun_is_a_noop(engine, warehouse_url):
    names = set(sa.inspect(engine).get_table_names())
    assert set(metadata.tables) <= names
    assert "alembic_version" in names
    warehouse.upgrade(engine)  # second run: nothing to do, no error
    with engine.connect() as conn:
        heads = conn.execute(sa.text("select version_num from alembic_version")).scalars().all()
    assert heads and all(h for h in heads)


def test_upsert_inserts_then_updates(engine):
    now = datetime.now(UTC)
    row = dict(id="labts_1", name="A", lab_name="L", attributes={"name": "A"}, relationships={},
               content_sha256="x" * 64, first_seen_at=now, last_seen_at=now)
    with engine.begin() as conn:
        upsert(conn, rupa_lab_tests, [row, {**row, "id": "labts_2"}], key=["id"])
        upsert(conn, rupa_lab_tests, [{**row, "name": "B", "attributes": {"name": "B"}}], key=["id"],
               update=["name", "attributes"])
    with engine.connect() as conn:
        got = dict(conn.execute(sa.select(rupa_lab_tests.c.id, rupa_lab_tests.c.name)).all())
        attrs = conn.execute(sa.select(rupa_lab_tests.c.attributes).where(rupa_lab_tests.c.id == "labts_1")).scalar_one()
    assert got == {"labts_1": "B", "labts_2": "A"}
    assert attrs == {"name": "B"}


def test_bad_warehouse_url_is_a_config_error():
    with pytest.raises(ConfigError, match="LABSYNC_WAREHOUSE_URL"):
        warehouse.connect("not a url at all")


def test_unreachable_warehouse_is_a_config_error_without_password():
    with pytest.raises(ConfigError) as info:
        warehouse.connect("postgresql+psycopg://u:hunter2@127.0.0.1:1/nowhere")
    assert "hunter2" not in str(info.value)
