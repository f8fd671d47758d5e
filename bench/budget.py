"""Benchmark: four loader processes share one LetsGetChecked budget through the warehouse.

Each loader alone would send at LGC_RATE_LIMIT with LGC_CONCURRENCY requests in flight; four of
them at once, without a shared budget, would send four times that. This starts the sandbox in
its own process (20 ms latency by default), a SQLite warehouse in a temp dir (or --warehouse
URL), and four `load_rows` processes configured like the CLI (environment variables), released
together. What the sandbox saw is printed against the limits: the aggregate orders/s, the
busiest sliding second, and the peak number of requests in flight.

    .venv/bin/python bench/budget.py [--loaders 4] [--orders 300] [--rate 100] [--concurrency 8]
                                     [--latency 0.02] [--warehouse URL]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.load import _free_port, _row, _start_sandbox  # noqa: E402


def worker(prefix: str, orders: int, go: str) -> None:
    """One loader process: set up, say so, wait for the go file, load, print the summary."""
    from etl import warehouse
    from etl.orders.load import load_rows
    from etl.settings import Settings

    settings = Settings.from_env()
    engine = warehouse.connect(settings.warehouse_url)
    rows = [_row(i, prefix) for i in range(orders)]
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.005)
    summary = load_rows(engine, settings, rows)
    print(json.dumps(summary.as_dict()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loaders", type=int, default=4)
    ap.add_argument("--orders", type=int, default=300, help="orders per loader")
    ap.add_argument("--rate", type=float, default=100.0, help="LGC_RATE_LIMIT, orders/s")
    ap.add_argument("--concurrency", type=int, default=8, help="LGC_CONCURRENCY")
    ap.add_argument("--latency", type=float, default=0.02)
    ap.add_argument("--warehouse", help="a SQLAlchemy URL (default: a SQLite file in a temp dir)")
    ap.add_argument("--worker", nargs=3, metavar=("PREFIX", "ORDERS", "GO_FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2])
        return

    port = _free_port()
    sandbox = _start_sandbox(port)
    try:
        base = f"http://127.0.0.1:{port}"
        httpx.post(f"{base}/_sandbox/lgc/faults", json={"latency": args.latency}).raise_for_status()
        with tempfile.TemporaryDirectory(prefix="labsync-bench-") as tmp:
            url = args.warehouse or f"sqlite:///{Path(tmp) / 'bench.db'}"
            from etl import warehouse

            warehouse.upgrade_url(url).dispose()  # migrate once, before the loaders start
            env = {k: v for k, v in os.environ.items() if not k.startswith(("LGC_", "LABSYNC_"))}
            env.update(LGC_BASE_URL=f"{base}/lgc", LABSYNC_WAREHOUSE_URL=url,
                       LGC_RATE_LIMIT=str(args.rate), LGC_CONCURRENCY=str(args.concurrency),
                       PYTHONPATH=str(REPO))
            go = Path(tmp) / "go"
            procs = [
                subprocess.Popen([sys.executable, __file__, "--worker", f"L{n}", str(args.orders), str(go)],
                                 env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
                for n in range(args.loaders)
            ]
            for p in procs:
                if p.stdout.readline().strip() != "ready":
                    raise SystemExit("a loader failed to start")
            go.touch()
            summaries = [json.loads(p.communicate()[0].splitlines()[-1]) for p in procs]
        seen = httpx.get(f"{base}/_sandbox/lgc/traffic", timeout=30).json()
    finally:
        sandbox.terminate()
        sandbox.wait(timeout=10)

    from etl.lgc.budget import BLOCK_SECONDS
    from etl.sandbox.lgc import max_in_window

    starts = sorted(seen["starts"])
    span = starts[-1] - starts[0] if len(starts) > 1 else 0.0
    rate = (len(starts) - 1) / span if span else 0.0
    block = max(1, round(args.rate * BLOCK_SECONDS))
    busiest = max_in_window(starts)
    total = args.loaders * args.orders
    print(f"labsync budget bench: {args.loaders} loader processes x {args.orders} orders, "
          f"LGC_RATE_LIMIT {args.rate:g}/s, LGC_CONCURRENCY {args.concurrency}, sandbox latency "
          f"{args.latency * 1000:.0f} ms, {'SQLite' if not args.warehouse else args.warehouse.split(':')[0]} "
          f"warehouse, {os.cpu_count()} CPUs")
    print(f"  outcome:        {sum(s['counts'].get('accepted', 0) for s in summaries)} of {total} "
          f"accepted; PUTs seen by the sandbox {seen['puts']}")
    print(f"  aggregate:      {rate:.1f} orders/s over {span:.2f}s (limit {args.rate:g}/s -> "
          f"{rate / args.rate:.2f} of it)")
    print(f"  busiest second: {busiest} requests (limit {args.rate:g} + one block of {block})")
    print(f"  peak in flight: {seen['max_in_flight']} at the sandbox (limit {args.concurrency})")
    print("  per loader:     " + ", ".join(
        f"L{n} {s['counts'].get('accepted', 0)} in {s['elapsed']:.1f}s" for n, s in enumerate(summaries)))
    print(f"  without it:     each loader alone keeps its own limits: up to {args.loaders * args.rate:g} "
          f"orders/s and {args.loaders * args.concurrency} in flight together")


if __name__ == "__main__":
    main()
