"""Alembic environment: runs on the connection `etl.warehouse.upgrade` hands over, or on
sqlalchemy.url when called from the alembic command line."""

from alembic import context
from sqlalchemy import engine_from_config, pool

from etl.warehouse.tables import metadata

config = context.config


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:  # pragma: no cover - plain `alembic` CLI use
    engine = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as conn:
        _run(conn)
