"""`labsync doctor`: is this deployment ready to run? One check per thing that must be right,
each saying what is wrong and what to do about it.

    settings        every setting reads and passes its checks (etl.settings), the DAG files' too
    warehouse       reachable, at the schema revision this code needs (SCHEMA_HEADS)
    encryption key  LABSYNC_FERNET_KEY present and a Fernet key (or the SQLite key file)
    inbox           the inbox folder exists and labsync may write to it
    LetsGetChecked  reachable and the credentials accepted: a token is fetched, no order is sent
    Rupa            reachable and its token usable (a stored OAuth token, refreshed if due, or
                    RUPA_API_TOKEN): one page of one lab test is read, nothing is sent

Nothing is created, migrated or sent; a check that cannot run because an earlier one failed
says so. Messages name settings and URLs, never secrets (they pass etl.redact.clean).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from etl.errors import CheckProblem, LabsyncError
from etl.redact import clean
from etl.settings import DagSettings, RetrySettings, Settings

OK, PROBLEM, SKIPPED = "ok", "problem", "not checked"
# a doctor answers quickly: one retry, short timeouts (a vendor that is down says so in seconds)
DOCTOR_RETRY = RetrySettings(max_attempts=2, initial_wait=0.2, max_wait=1.0, timeout=10.0)


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK

    def as_dict(self) -> dict:
        return {"check": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


def _plain(text: str) -> str:
    """A check's sentence through the redaction point (never a secret), whole."""
    return clean(text, limit=None) or ""


def _run(name: str, fn: Callable[[], str], fix: str = "") -> Check:
    try:
        return Check(name, OK, _plain(fn()))
    except CheckProblem as p:
        return Check(name, PROBLEM, _plain(p.detail), _plain(p.fix))
    except LabsyncError as exc:  # our own errors say what is wrong and, mostly, what to do
        return Check(name, PROBLEM, _plain(str(exc)), fix)
    except Exception as exc:  # noqa: BLE001 - a doctor reports, it never crashes on what it checks
        return Check(name, PROBLEM, f"unexpected {type(exc).__name__}", fix or "rerun with LABSYNC_DEBUG=1")


def _skipped(name: str, why: str) -> Check:
    return Check(name, SKIPPED, why)


def run(env=None, *, retry: RetrySettings = DOCTOR_RETRY) -> list[Check]:
    """Every check, in order, from the environment `env` (default os.environ)."""
    try:
        settings = Settings.from_env(env).checked()
        settings.webhooks.validated()
        settings.lifecycle.validated()
        settings.lgc.network.validated("LGC")
        settings.rupa.network.validated("RUPA")
        DagSettings.from_env(env)  # what only the DAG files read is checked too
    except LabsyncError as exc:
        checks = [Check("settings", PROBLEM, _plain(str(exc)), "fix that variable, then run labsync doctor again")]
        return checks + [_skipped(n, "the settings must read first") for n in
                         ("warehouse", "encryption key", "inbox", "LetsGetChecked", "Rupa")]
    settings = replace(settings, retry=replace(retry, timeout=min(retry.timeout, settings.retry.timeout)))
    checks = [Check("settings", OK, "every setting reads and passes its checks")]
    engine = None

    def warehouse_check() -> str:
        nonlocal engine
        engine = _warehouse(settings.warehouse_url)
        return _schema(engine)

    checks.append(_run("warehouse", warehouse_check, "check LABSYNC_WAREHOUSE_URL"))
    checks.append(_run("encryption key", lambda: _fernet(settings, engine)))
    checks.append(_run("inbox", lambda: _inbox(settings.inbox, settings.inbox_conn_id)))
    checks.append(_run("LetsGetChecked", lambda: _lgc(settings), "check LGC_BASE_URL and the credentials"))
    if engine is None and not settings.rupa.api_token:
        checks.append(_skipped("Rupa", "its OAuth tokens are in the warehouse, which could not be read"))
    else:
        checks.append(_run("Rupa", lambda: _rupa(settings, engine), "check RUPA_BASE_URL and the credentials"))
    if engine is not None:
        engine.dispose()
    return checks


def run_until_ok(wait: float = 0.0, env=None, *, pause: float = 0.5) -> list[Check]:
    """`run()` again every `pause` seconds until every check passes or `wait` seconds went by
    (`labsync doctor --wait 30` right after starting a sandbox, a database or a deployment)."""
    import time

    deadline = time.monotonic() + max(0.0, wait)
    while True:
        checks = run(env)
        if all(c.ok for c in checks) or time.monotonic() + pause > deadline:
            return checks
        time.sleep(pause)


# ---- the checks ----------------------------------------------------------------------------
def _warehouse(url: str):
    from sqlalchemy.engine import make_url

    from etl import warehouse

    try:
        parsed = make_url(url)
    except Exception:
        raise CheckProblem("LABSYNC_WAREHOUSE_URL is not a SQLAlchemy URL",
                       "e.g. sqlite:///.labsync/labsync.db or postgresql+psycopg://user@host/db") from None
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        if not Path(parsed.database).exists():  # connecting would create an empty file
            raise CheckProblem(f"no warehouse at {shown} yet", "run `labsync db upgrade` (it creates it)")
    engine = warehouse.make_engine(url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as exc:
        engine.dispose()
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckProblem(f"cannot connect to the warehouse at {shown}: {clean(reason, limit=200)}",
                       "check LABSYNC_WAREHOUSE_URL and that the database server is up") from None
    return engine


def _schema(engine) -> str:
    from etl import warehouse

    shown = engine.url.render_as_string(hide_password=True)
    heads = warehouse.schema_heads(engine)
    need = ", ".join(sorted(warehouse.SCHEMA_HEADS))
    if heads != set(warehouse.SCHEMA_HEADS):
        have = ", ".join(sorted(heads)) if heads else "no labsync tables"
        raise CheckProblem(f"{shown}: schema at {have}, this labsync needs {need}", "run `labsync db upgrade`")
    return f"{shown}, schema at {need}"


def _fernet(settings: Settings, engine) -> str:
    from etl.vault import key_file_for, parse_keys

    if settings.fernet_key:
        keys = parse_keys(settings.fernet_key)
        return f"LABSYNC_FERNET_KEY holds {len(keys)} key{'s' if len(keys) > 1 else ''}"
    if engine is None:
        raise CheckProblem("LABSYNC_FERNET_KEY is not set (and the warehouse could not be read to look "
                       "for an embedded key file)", "set LABSYNC_FERNET_KEY (`labsync db new-key` prints one)")
    path = key_file_for(engine)
    if path is None:
        raise CheckProblem("LABSYNC_FERNET_KEY is not set; a server warehouse needs it for the stored "
                       "tokens and the orders waiting to be sent",
                       "set LABSYNC_FERNET_KEY on the CLI and every worker (`labsync db new-key` prints one)")
    if path.exists():
        return f"the embedded warehouse's key file {path}"
    return f"the embedded warehouse's key file, made on first use at {path}"


def _inbox(location: str | Path, conn_id: str | None = None) -> str:
    if "://" in str(location):  # an object store: list it (nothing written, nothing created)
        from etl.errors import LabsyncError
        from etl.intake import storage

        try:
            store = storage.open_store(str(location), conn_id=conn_id)
            n = sum(1 for _ in store.files())
        except LabsyncError as exc:
            raise CheckProblem(str(exc), "check LABSYNC_INBOX and the store's credentials "
                           "(AWS_* variables, or LABSYNC_INBOX_CONN_ID in Airflow)") from None
        return f"{storage.display(location)} is reachable ({n} files waiting)"
    path = Path(location).absolute()
    if not path.exists():
        raise CheckProblem(f"the inbox {path} does not exist",
                       f"mkdir -p {path} (labsync inbox and the order_batches DAG also create it)")
    if not path.is_dir():
        raise CheckProblem(f"the inbox {path} is not a folder", "point LABSYNC_INBOX at a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise CheckProblem(f"labsync may not write to the inbox {path}",
                       "give the user running labsync write access (files are moved to processed/ and failed/)")
    return f"{path} exists and is writable"


def _lgc(settings: Settings) -> str:
    import asyncio

    from etl.http import make_async_client
    from etl.lgc.auth import TokenProvider

    lgc = settings.lgc.validated()
    if lgc.api_token:
        return f"{lgc.base_url}: LGC_API_TOKEN is set and used as is (checked by the first request)"

    async def fetch() -> None:
        async with make_async_client("", settings.retry, lgc.network, concurrency=1) as http:
            await TokenProvider(lgc, settings.retry).token(http)

    asyncio.run(fetch())
    return f"{lgc.base_url}: credentials accepted, token fetched (nothing sent)"


def _rupa(settings: Settings, engine) -> str:
    import sqlalchemy as sa

    from etl.rupa.auth import NOT_AUTHORIZED, PROVIDER
    from etl.rupa.client import open_client
    from etl.warehouse import oauth_tokens

    rupa = settings.rupa.validated()
    if not rupa.api_token:
        with engine.connect() as conn:
            stored = conn.execute(sa.select(sa.func.count()).select_from(oauth_tokens)
                                  .where(oauth_tokens.c.provider == PROVIDER)).scalar_one()
        if not stored:
            raise CheckProblem("no Rupa tokens in the warehouse", NOT_AUTHORIZED.split(": ", 1)[1])
    with open_client(replace(settings, rupa=replace(rupa, page_size=1)), engine) as client:
        client.request("GET", client.first_page_url("/lab_tests"))
        refreshed = " (refreshed)" if getattr(client.auth, "refreshes", 0) else ""
    how = "RUPA_API_TOKEN" if rupa.api_token else f"the stored OAuth token{refreshed}"
    return f"{rupa.base_url}: {how} usable (one lab test read, nothing sent)"
