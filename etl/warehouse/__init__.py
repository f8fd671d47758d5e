"""The warehouse: an engine from any SQLAlchemy URL, its schema managed by Alembic at deploy time.

`connect(url)` is what callers use: it creates the engine (SQLite gets WAL and a busy timeout so
threads and processes can share the file) and checks, once per process and URL, that the schema
is the one this code needs, by comparing the `alembic_version` row(s) with `SCHEMA_HEADS`. It
never migrates and never imports Alembic: commands and tasks start fast, and a hundred tasks
starting at once do not race to alter tables. `labsync db upgrade` (`upgrade()`) migrates, under
a lock: `pg_advisory_xact_lock` on PostgreSQL; on SQLite `BEGIN IMMEDIATE`, which takes the
database's one write lock before Alembic reads the version, so a second upgrade waits for the
first and then finds nothing to do.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url

from etl.errors import ConfigError, LabsyncError, WarehouseRefused, WarehouseUnavailable

from .tables import (  # noqa: F401  (re-exported)
    SCHEMA_HEADS,
    batch_files,
    lgc_orders,
    lgc_outbox,
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

# pg_advisory_xact_lock key for migrations: "labsync" in ASCII, as a bigint.
MIGRATION_LOCK_KEY = 0x6C616273796E63

_checked: set[str] = set()
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
            private_files(Path(db))
        # hide_parameters: a database error's message never carries the bound values (PHI)
        engine = create_engine(parsed, connect_args={"timeout": 60}, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        return engine
    return create_engine(parsed, pool_pre_ping=True, hide_parameters=True)


SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def private_files(db: Path) -> None:
    """An embedded SQLite warehouse holds PHI: its file is created 0600 (owner only), before
    SQLite opens it; SQLite gives the -wal, -shm and -journal files it makes later the database
    file's own mode. Files an older labsync made readable by everyone lose that (their group
    bits are left alone: a deployment may share the file with a group on purpose)."""
    # Never open an existing file here: closing any descriptor of a database file drops the POSIX
    # locks SQLite holds on it in this process (another engine's), which corrupts it under load.
    if not db.exists():
        try:
            os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass  # another process made it meanwhile (SQLite creates it 0644: fixed below)
        except OSError:
            return  # not ours to create (read-only, a directory): SQLite says so in its own words
    for path in (db, *(db.with_name(db.name + suffix) for suffix in SQLITE_COMPANIONS)):
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o007:
                path.chmod(mode & ~0o007)
        except OSError:
            continue  # gone meanwhile, or another user's file


def alembic_config():
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    return cfg


def script_heads() -> set[str]:
    """The heads of the migration scripts (imports Alembic; for `db upgrade` and tests)."""
    from alembic.script import ScriptDirectory

    return set(ScriptDirectory.from_config(alembic_config()).get_heads())


def schema_heads(engine: Engine) -> set[str] | None:
    """The revision(s) the database is at, or None when it has no labsync schema at all."""
    with engine.connect() as conn:
        try:
            return set(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
        except Exception as exc:
            if as_unavailable(exc) is not None and not _is_missing_table(exc):
                raise
            return None


def _is_missing_table(exc: BaseException) -> bool:
    text_ = str(getattr(exc, "orig", exc)).lower()
    return "no such table" in text_ or "does not exist" in text_


def upgrade(engine: Engine, revision: str = "heads") -> None:
    """Bring the schema to `revision` (idempotent), holding the migration lock throughout."""
    from alembic import command

    cfg = alembic_config()
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
        elif conn.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        conn.commit()
    with _lock:
        _checked.discard(_key(engine))


def upgrade_url(url: str) -> Engine:
    """`labsync db upgrade`: migrate the warehouse at `url`; return a checked engine."""
    engine = make_engine(url)
    try:
        upgrade(engine)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"cannot reach or migrate the warehouse ({type(exc).__name__}); check LABSYNC_WAREHOUSE_URL"
        ) from exc
    return connect(url)


def _key(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def check_schema(engine: Engine) -> None:
    """Raise ConfigError unless the database is at exactly SCHEMA_HEADS (checked once per URL)."""
    key = _key(engine)
    with _lock:
        if key in _checked:
            return
    try:
        heads = schema_heads(engine)
    except Exception as exc:
        raise ConfigError(
            f"cannot reach the warehouse ({type(exc).__name__}); check LABSYNC_WAREHOUSE_URL"
        ) from exc
    if heads != set(SCHEMA_HEADS):
        have = ", ".join(sorted(heads)) if heads else "nothing (no labsync tables)"
        raise ConfigError(
            f"the warehouse schema is at {have}, labsync needs {', '.join(sorted(SCHEMA_HEADS))}: "
            "run `labsync db upgrade`"
        )
    with _lock:
        _checked.add(key)


def connect(url: str, *, check: bool = True) -> Engine:
    """An engine for `url` whose schema is the one this code needs (never migrates)."""
    engine = make_engine(url)
    if check:
        check_schema(engine)
    return engine


# SQLSTATE classes meaning "the server is gone or cannot take writes": connection exceptions,
# insufficient resources (disk full, out of memory), operator intervention (shutdown), system
# errors; and 25006, a read-only transaction.
_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57", "58")


def as_unavailable(exc: BaseException) -> WarehouseUnavailable | None:
    """A WarehouseUnavailable for a database error that means the warehouse is down, full or
    read-only; None for anything else (a bug, or not a database error). The message names the
    driver's error class only: the driver's text can quote the SQL parameters, which hold PHI."""
    import sys

    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is None or not isinstance(exc, sa_exc.DBAPIError):
        return None
    orig = getattr(exc, "orig", None)
    state = str(getattr(orig, "sqlstate", "") or "")
    down = (
        isinstance(exc, sa_exc.OperationalError)
        or exc.connection_invalidated
        or state.startswith(_UNAVAILABLE_SQLSTATE_CLASSES)
        or state == "25006"
    )
    if not down:
        return None
    kind = type(orig).__name__ if orig is not None else type(exc).__name__
    return WarehouseUnavailable(
        f"the warehouse is unavailable or refused a write ({kind}); nothing is lost: rows whose "
        "outcome was not recorded stay in the outbox and go out on a later run"
    )


def as_refused(exc: BaseException, what: str) -> LabsyncError | None:
    """A database error on one item's write, as a plain error: WarehouseUnavailable when the
    warehouse is down, full or read-only (as_unavailable), else WarehouseRefused "the warehouse
    refused <what> (<driver's error class>)". None for anything that is not a database error. The
    driver's own text is never kept: PostgreSQL's names the failing row's values."""
    unavailable = as_unavailable(exc)
    if unavailable is not None:
        return unavailable
    import sys

    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is None or not isinstance(exc, sa_exc.StatementError):
        return None
    kind = type(exc).__name__
    orig = getattr(exc, "orig", None)
    if orig is not None and type(orig).__name__ != kind:  # the driver's class: CheckViolation, ...
        kind = f"{kind}: {type(orig).__name__}"
    return WarehouseRefused(f"the warehouse refused {what} ({kind})")
