"""Helpers shared by the tests of LetsGetChecked after the PUT (tests/test_lgc_lifecycle*.py,
tests/test_lgc_results.py): orders placed through the real loader, warehouse reads, a webhook
receiver, and the in-process CLI runner."""

from __future__ import annotations

import base64
import os
from contextlib import contextmanager
from dataclasses import replace

import pytest
import sqlalchemy as sa

from etl import cli
from etl.asgi import BackgroundServer
from etl.orders.load import load_rows
from etl.settings import Settings, WebhookSettings
from etl.warehouse.tables import lgc_item_status_history, lgc_order_items
from etl.webhooks.app import build_app
from tests.test_lgc_support import cli_env, fast, order_row

WEBHOOK_KEY = base64.b64encode(b"labsync lifecycle test key, 32b").decode()


def lgc(sandbox):
    """The LetsGetChecked sandbox's state behind a SandboxServer."""
    return sandbox.sandbox.lgc


def place_orders(engine, settings: Settings, n: int, *, start: int = 0, **overrides) -> list[str]:
    """Load `n` orders through the real loader; returns their clientOrderIds (all accepted)."""
    rows = [order_row(i, **overrides) for i in range(start, start + n)]
    summary = load_rows(engine, fast(settings, concurrency=4), rows)
    assert dict(summary.counts) == {"accepted": n}, summary.counts
    return [r["client_order_id"] for r in rows]


def items(engine) -> dict[str, dict]:
    with engine.connect() as conn:
        return {r.item_id: dict(r._mapping) for r in conn.execute(sa.select(lgc_order_items))}


def history(engine, item_id: str | None = None) -> list[dict]:
    q = sa.select(lgc_item_status_history).order_by(lgc_item_status_history.c.id)
    if item_id is not None:
        q = q.where(lgc_item_status_history.c.item_id == item_id)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


@contextmanager
def receiver(engine, key: str | None = WEBHOOK_KEY):
    """labsync's webhook receiver on a loopback port, storing into `engine`."""
    with BackgroundServer(build_app(engine, WebhookSettings(lgc_key=key))) as server:
        yield server


def send_webhooks_to(sandbox, server, *, key: str | None = WEBHOOK_KEY, **switches) -> None:
    """Point the sandbox's webhook sender at `server` (signed with `key`)."""
    lgc(sandbox).lifecycle.configure(webhook_url=f"{server.url}/webhooks/lgc", webhook_key=key, **switches)


def quick(settings: Settings, **lifecycle) -> Settings:
    """Settings with the loader's concurrency for tests and lifecycle overrides."""
    s = fast(settings, concurrency=4)
    return replace(s, lifecycle=replace(s.lifecycle, **lifecycle)) if lifecycle else s


@pytest.fixture
def run(settings, monkeypatch, capsys):
    """Run `labsync ARGS` in this process with the environment pointing at the sandbox."""
    env = cli_env(fast(settings, concurrency=4))
    for key in list(os.environ):
        if key.startswith(("LGC_", "LABSYNC_")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(("LGC_", "LABSYNC_")):
            monkeypatch.setenv(key, value)

    def _run(*args: str):
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return _run
