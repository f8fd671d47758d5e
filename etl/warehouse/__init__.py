"""The warehouse: an engine from any SQLAlchemy URL, its schema kept current by Alembic.

`connect(url)` is what callers use: it creates the engine (SQLite gets WAL and a busy timeout so
threads and processes can share the file) and runs pending migrations once per process and URL.
"""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from etl.errors import ConfigError

from .tables import (  # noqa: F401  (re-exported)
    batch_files,
    lgc_orders,
    metadata,
    oauth_tokens,
    rejected_rows,
    rupa_lab_tests,
    rupa_order_intents,
    rupa_ordered_tests,
    rupa_orders,
    rupa_patients,
    rupa_results,
    sync_state,
    webhook_events,
)
from .upsert import upsert  # noqa: F401

_migrated: set[str] = set()
_lock = threading.Lock()


def make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except Exception:
        raise ConfigError("LABSYNC_WAREHOUSE_URL is not a valid SQLAlchemy URL") from None
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if db and db != ":memory:" and not db.startswith("file:"):
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        return engine
    return create_engine(parsed, pool_pre_ping=True)


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    return cfg


def upgrade(engine: Engine, revision: str = "heads") -> None:
    """Bring the schema to the newest revision (idempotent)."""
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def connect(url: str, *, migrate: bool = True) -> Engine:
    """An engine for `url` whose schema is current (migrations run once per process and URL)."""
    engine = make_engine(url)
    if migrate:
        key = engine.url.render_as_string(hide_password=False)
        with _lock:
            if key not in _migrated:
                try:
                    upgrade(engine)
                except ConfigError:
                    raise
                except Exception as exc:
                    raise ConfigError(
                        f"cannot reach or migrate the warehouse ({type(exc).__name__}); "
                        "check LABSYNC_WAREHOUSE_URL"
                    ) from exc
                _migrated.add(key)
    return engine
