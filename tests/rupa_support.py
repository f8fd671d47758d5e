"""Helpers for the Rupa tests: authorize through the sandbox's real OAuth flow, count rows."""

from __future__ import annotations

from dataclasses import replace

import httpx
import sqlalchemy as sa

from etl.rupa.auth import Tokens, authorization_url, exchange_code, parse_authorization_response
from etl.settings import Settings
from etl.warehouse import sync_state


def with_rupa(settings: Settings, **changes) -> Settings:
    return replace(settings, rupa=replace(settings.rupa, **changes))


def authorize(engine, settings: Settings) -> Tokens:
    """What `labsync rupa authorize` does, with the browser step done by httpx: open the consent
    URL, read the redirect, exchange the code. Tokens land in `oauth_tokens`."""
    state = "teststate"
    url = authorization_url(settings.rupa.validated(), state)
    redirect = httpx.get(url, follow_redirects=False)
    assert redirect.status_code == 302
    return exchange_code(engine, settings, parse_authorization_response(redirect.headers["location"], state))


def count(engine, table, *, live: bool = False) -> int:
    q = sa.select(sa.func.count()).select_from(table)
    if live:
        q = q.where(table.c.deleted_at.is_(None))
    with engine.connect() as conn:
        return int(conn.execute(q).scalar_one())


def state_of(engine, stream: str) -> dict | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(sync_state).where(sync_state.c.stream == stream)).mappings().first()
    return dict(row) if row else None


def cli_env(monkeypatch, settings: Settings, *, page_size: int = 7) -> dict:
    """Environment variables for `labsync` pointing at the sandbox and the test warehouse."""
    env = {
        "RUPA_BASE_URL": settings.rupa.base_url,
        "LABSYNC_WAREHOUSE_URL": settings.warehouse_url,
        "RUPA_PAGE_SIZE": str(page_size),
        "LABSYNC_RETRY_ATTEMPTS": str(settings.retry.max_attempts),
        "LABSYNC_RETRY_INITIAL_WAIT": str(settings.retry.initial_wait),
        "LABSYNC_RETRY_MAX_WAIT": str(settings.retry.max_wait),
        "LABSYNC_HTTP_TIMEOUT": str(settings.retry.timeout),
        "LABSYNC_FERNET_KEY": settings.fernet_key or "",
    }
    for name in ("RUPA_API_TOKEN", "RUPA_CLIENT_ID", "RUPA_CLIENT_SECRET", "RUPA_AUTHORIZE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


INTENT_COLUMNS = ["row_id", "rupa_patient_id", "first_name", "last_name", "email", "birthday",
                  "lab_test_ids", "return_url"]


def write_intents(path, rows: list[dict]):
    """An order-intents CSV with the contract's columns (plus any metadata.<key> the rows have)."""
    import csv

    columns = list(dict.fromkeys([*INTENT_COLUMNS, *(k for r in rows for k in r)]))
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return path


def ledger(engine) -> dict[str, dict]:
    """rupa_order_intents by row_id."""
    from etl.warehouse import rupa_order_intents

    with engine.connect() as conn:
        return {r["row_id"]: dict(r) for r in conn.execute(sa.select(rupa_order_intents)).mappings()}
