"""One loader in its own process, configured like the CLI (environment variables), started on a
signal so several begin at once. Used by tests/test_lgc_budget.py.

    python -m tests.lgc_loader_probe PREFIX ROWS GO_FILE   -> prints "ready", waits for GO_FILE,
                                                              loads ROWS orders PREFIX-00000...,
                                                              prints the summary as JSON
    python -m tests.lgc_loader_probe hold GO_FILE          -> takes the whole concurrency budget,
                                                              prints "holding", sleeps forever
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from etl import warehouse
from etl.settings import Settings


def _wait(go: str) -> None:
    while not os.path.exists(go):
        time.sleep(0.01)


def load(prefix: str, rows: int, go: str) -> None:
    from etl.orders.load import load_rows
    from tests.test_lgc_support import order_row

    settings = Settings.from_env()
    engine = warehouse.connect(settings.warehouse_url)
    batch = [order_row(i, client_order_id=f"{prefix}-{i:05d}") for i in range(rows)]
    print("ready", flush=True)
    _wait(go)
    summary = load_rows(engine, settings, batch)
    print(json.dumps(summary.as_dict()), flush=True)


async def hold(lease: float) -> None:
    from etl.lgc.budget import AsyncBudget

    settings = Settings.from_env()
    lgc = settings.lgc.validated()
    engine = warehouse.connect(settings.warehouse_url)
    budget = AsyncBudget(lgc, engine, holder="probe-hold", lease=lease, tick=0.1)
    await budget.start()
    for _ in range(lgc.concurrency):
        await budget.acquire()
    print("holding", budget.limit, flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    if sys.argv[1] == "hold":
        asyncio.run(hold(float(sys.argv[2])))
    else:
        load(sys.argv[1], int(sys.argv[2]), sys.argv[3])
