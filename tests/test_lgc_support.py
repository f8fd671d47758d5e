"""Helpers shared by the tests/test_lgc_*.py files (no tests here): valid order rows, CSV
writing, settings tweaks and ledger reads."""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import replace
from pathlib import Path

import sqlalchemy as sa

from etl.settings import RetrySettings, Settings
from etl.warehouse import lgc_orders
from schemas.columns import COLUMNS

REPO = Path(__file__).resolve().parent.parent


def order_row(i: int, **overrides) -> dict:
    """A validated row dict (as etl.intake.validate yields it) for order number `i`."""
    row: dict = {c: None for c in COLUMNS}
    row.update(
        line=i + 2,
        client_order_id=f"ORD-{i:05d}",
        program_code="Health4All",
        participant_id=f"P{i:05d}",
        first_name="Ada",
        last_name="Lovelace",
        email=f"ada{i}@example.org",
        phone_country_code="+1",
        phone_number="5550100001",
        gender="Female",
        dob="1961-02-11",
        ethnicity="NonHispanic",
        race="Caucasian",
        address_line1=f"{i} Main Street",
        city="Springfield",
        state="NY",
        postal_code="10007",
        country="US",
        order_items="GLCS;FCIT:2",
    )
    row.update(overrides)
    return row


def csv_row(i: int, **overrides) -> dict:
    """The same order as a CSV record (strings, empty for missing)."""
    row = order_row(i, **overrides)
    row.pop("line")
    return {k: "" if v is None else str(v) for k, v in row.items()}


def write_csv(path: Path, records: list[dict], *, columns: list[str] | None = None) -> Path:
    columns = columns or list(dict.fromkeys([*COLUMNS, *(k for r in records for k in r)]))
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(records)
    return path


def fast(settings: Settings, *, concurrency: int = 8, rate_limit: float = 0.0,
         retry: RetrySettings | None = None, **lgc) -> Settings:
    return replace(
        settings,
        lgc=replace(settings.lgc, concurrency=concurrency, rate_limit=rate_limit, **lgc),
        retry=retry or settings.retry,
    )


def ledger(engine) -> dict[str, dict]:
    with engine.connect() as conn:
        return {r.client_order_id: dict(r._mapping) for r in conn.execute(sa.select(lgc_orders))}


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for a `labsync` subprocess pointing at the test sandbox and warehouse."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LGC_", "LABSYNC_"))}
    env.update(
        LGC_BASE_URL=settings.lgc.base_url,
        LABSYNC_WAREHOUSE_URL=settings.warehouse_url,
        LGC_CONCURRENCY=str(settings.lgc.concurrency),
        LGC_RATE_LIMIT=str(settings.lgc.rate_limit),
        LABSYNC_RETRY_ATTEMPTS=str(settings.retry.max_attempts),
        LABSYNC_RETRY_INITIAL_WAIT=str(settings.retry.initial_wait),
        LABSYNC_RETRY_MAX_WAIT=str(settings.retry.max_wait),
        LABSYNC_HTTP_TIMEOUT=str(settings.retry.timeout),
        LABSYNC_FERNET_KEY=settings.fernet_key or "",
        PYTHONPATH=str(REPO),
    )
    env.update(extra)
    return env


LABSYNC = [sys.executable, "-m", "etl.cli"]


def put_item(row: dict):
    """(client_order_id, body, content) of a row, as the loader hands them to LgcClient.put_order."""
    from types import SimpleNamespace

    from etl.orders.outbox import body_bytes
    from etl.orders.payload import build_payload, client_order_id, payload_sha256

    body = build_payload(row)
    return SimpleNamespace(client_order_id=client_order_id(row), body=body, content=body_bytes(body),
                           sha256=payload_sha256(body), line=row.get("line"))


def outbox_rows(engine, batch_id: int | None = None) -> dict[str, dict]:
    """The outbox rows (of one batch, or all) by clientOrderId."""
    from etl.warehouse import lgc_outbox

    q = sa.select(lgc_outbox)
    if batch_id is not None:
        q = q.where(lgc_outbox.c.batch_id == batch_id)
    with engine.connect() as conn:
        return {r.client_order_id: dict(r._mapping) for r in conn.execute(q.order_by(lgc_outbox.c.id))}


def stage_rows(engine, rows: list[dict], *, name: str = "(rows)") -> int:
    """A batch whose outbox holds `rows` (queued), as prepare leaves it; returns its id."""
    from etl.orders import outbox
    from etl.vault import vault_for
    from tests.conftest import TEST_FERNET_KEY

    batch_id = outbox.adhoc_batch(engine, name)
    outbox.write(engine, batch_id, rows, vault=vault_for(TEST_FERNET_KEY, engine))
    return batch_id


def load_batch(engine, settings: Settings, batch_id: int, *, owner: str = "cli:test", **kw):
    """Load every loadable outbox row of a batch, as a load task (or a rerun) does."""
    from etl.orders import outbox
    from etl.orders.load import LoadSummary, load_chunk

    summary = LoadSummary()
    for chunk in outbox.chunks(engine, [batch_id], 1 << 40, max_attempts=settings.max_attempts):
        summary = summary.merge(load_chunk(engine, settings, chunk, owner=owner, **kw))
    return summary
