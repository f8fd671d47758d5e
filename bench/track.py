"""Benchmark: `labsync track` over 10,000 open LetsGetChecked orders at 50 ms latency per request.

Prints orders/s, the ratio to the ideal concurrency / latency (the figure a concurrent GET per
order can reach at best), the tracker's CPU per order, and two baselines measured in the same run
on the same machine: the loader's PUTs at the same concurrency and latency (`--baseline` orders;
tracking should match it, since both are one request per order) and a sequential tracker
(concurrency 1, `--sequential` orders). Tracking uses the load's settings
(`LGC_CONCURRENCY`, `LGC_RATE_LIMIT`, one keep-alive connection per worker, the shared token), so
the main run uses bench/load.py's: concurrency 20, client-side rate limit off. A second, short run
at the shipped defaults (concurrency 8, 50 requests/s) shows the rate limit holding.

The orders are placed first with the real loader (latency 0), then the sandbox's latency is set.
The sandbox runs in its own process (`labsync sandbox`); the warehouse is a SQLite file.

    .venv/bin/python bench/track.py [--orders 10000] [--concurrency 20] [--latency 0.05]
                                    [--baseline 1000] [--sequential 100] [--sample 400]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.load import _cpu, _free_port, _start_sandbox  # noqa: E402  (the same sandbox and clock as the load bench)
from bench.load import _row as _load_row  # noqa: E402
from etl import warehouse  # noqa: E402
from etl.orders.lifecycle import track  # noqa: E402
from etl.orders.load import load_rows  # noqa: E402
from etl.settings import LgcSettings, RetrySettings, Settings  # noqa: E402


def _row(i: int, prefix: str = "TRACK") -> dict:
    return _load_row(i, prefix)  # the load bench's order: two items (GLCS, FCIT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--baseline", type=int, default=1000, help="orders loaded at the same latency")
    ap.add_argument("--sequential", type=int, default=100, help="orders tracked at concurrency 1")
    ap.add_argument("--sample", type=int, default=400, help="orders tracked at the shipped defaults")
    args = ap.parse_args()

    port = _free_port()
    sandbox = _start_sandbox(port)
    base = f"http://127.0.0.1:{port}"
    try:
        with tempfile.TemporaryDirectory(prefix="labsync-bench-") as tmp:
            settings = Settings(
                warehouse_url=f"sqlite:///{Path(tmp) / 'bench.db'}",
                retry=RetrySettings(max_attempts=6, initial_wait=0.1, max_wait=2.0, timeout=30),
            )
            engine = warehouse.connect(settings.warehouse_url)
            lgc = replace(settings.lgc, base_url=f"{base}/lgc", rate_limit=0, concurrency=args.concurrency)
            fast = replace(settings, lgc=lgc)
            placed_at = time.perf_counter()
            loaded = load_rows(engine, fast, (_row(i) for i in range(args.orders)))
            placed = time.perf_counter() - placed_at

            httpx.post(f"{base}/_sandbox/lgc/faults", json={"latency": args.latency}).raise_for_status()
            cpu0 = _cpu()
            started = time.perf_counter()
            summary = track(engine, fast)
            elapsed = time.perf_counter() - started
            cpu = _cpu() - cpu0

            b_started = time.perf_counter()
            baseline = load_rows(engine, fast, (_row(i, "BASE") for i in range(args.baseline)))
            b_elapsed = time.perf_counter() - b_started

            one = replace(settings, lgc=replace(lgc, concurrency=1))
            q_started = time.perf_counter()
            q_summary = track(engine, one, [f"TRACK-{i:06d}" for i in range(args.sequential)])
            q_elapsed = time.perf_counter() - q_started

            defaults = LgcSettings()
            shipped = replace(settings, lgc=replace(lgc, concurrency=defaults.concurrency,
                                                    rate_limit=defaults.rate_limit))
            sample = [f"TRACK-{i:06d}" for i in range(args.sample)]
            s_started = time.perf_counter()
            s_summary = track(engine, shipped, sample)
            s_elapsed = time.perf_counter() - s_started
            engine.dispose()
    finally:
        sandbox.terminate()
        sandbox.wait(timeout=10)

    rate = summary.checked / elapsed
    ideal = args.concurrency / args.latency
    s_rate = s_summary.checked / s_elapsed
    b_rate = baseline.rows / b_elapsed
    q_rate = q_summary.checked / q_elapsed
    s_ideal = min(defaults.concurrency / args.latency, defaults.rate_limit or float("inf"))
    print(f"labsync track bench: {args.orders} open orders ({2 * args.orders} items), sandbox latency "
          f"{args.latency * 1000:.0f} ms, SQLite warehouse, {os.cpu_count()} CPUs")
    print(f"  placed:       {dict(loaded.counts)} in {placed:.1f}s (latency 0, not timed below)")
    print(f"  tracked:      {summary.checked} orders, {summary.changed} item statuses recorded, "
          f"{summary.requests} GETs, failed {len(summary.failed)}, statuses {summary.statuses}")
    print(f"  concurrent:   concurrency {args.concurrency}, rate limit off: {elapsed:.2f}s -> {rate:.0f} orders/s")
    print(f"  tracker CPU:  {cpu * 1000 / max(summary.checked, 1):.2f} ms per order ({cpu / elapsed:.0%} of one "
          f"core; load average {os.getloadavg()[0]:.1f} at the end)")
    print(f"  ideal:        concurrency / latency = {ideal:.0f} orders/s -> ratio {rate / ideal:.2f} (goal >= 0.90)")
    print(f"  vs the load:  {baseline.rows} orders loaded at the same concurrency and latency in {b_elapsed:.2f}s "
          f"-> {b_rate:.0f} orders/s; tracking / loading = {rate / b_rate:.2f} (goal >= 0.90)")
    print(f"  sequential:   concurrency 1, {q_summary.checked} orders in {q_elapsed:.2f}s -> {q_rate:.1f} orders/s; "
          f"speed-up {rate / q_rate:.1f}x")
    print(f"  defaults:     concurrency {defaults.concurrency}, rate limit {defaults.rate_limit:.0f}/s, "
          f"{s_summary.checked} orders in {s_elapsed:.2f}s -> {s_rate:.1f} orders/s "
          f"(cap min(concurrency / latency, rate limit) = {s_ideal:.0f}/s -> ratio {s_rate / s_ideal:.2f})")


if __name__ == "__main__":
    main()
