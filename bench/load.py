"""Benchmark: 5,000 LetsGetChecked orders loaded into the sandbox at 50 ms latency per request.

Prints orders/s, the ratio to the ideal concurrency / latency (goal >= 0.9) and the speed-up
over a sequential loop (goal >= 20x). The sequential baseline is the same loader at concurrency
1, timed on a sample (default 100 orders) and extrapolated to the full count: running 5,000
orders one by one at 50 ms would take over four minutes and tell nothing more.

The figure covers the whole way an order goes: its PUT body written to the warehouse's outbox
(what `prepare` does), then read back, claimed, sent and recorded by the loader; the outbox
part is also printed on its own.

The sandbox runs in its own process (`labsync sandbox`) so its CPU does not compete with the
loader's for one interpreter; the warehouse is a SQLite file in a temp dir; the client-side rate
limit is off (0) so the figure measures the pipeline, not the limiter.

    .venv/bin/python bench/load.py [--orders 5000] [--concurrency 20] [--latency 0.05]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from etl import warehouse  # noqa: E402
from etl.lgc import outbox  # noqa: E402
from etl.lgc.load import load_chunk, load_rows  # noqa: E402
from etl.settings import RetrySettings, Settings  # noqa: E402
from etl.vault import vault_for  # noqa: E402
from schemas.columns import COLUMNS  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _row(i: int, prefix: str) -> dict:
    row: dict = {c: None for c in COLUMNS}
    row.update(
        line=i + 2, client_order_id=f"{prefix}-{i:06d}", program_code="Health4All",
        participant_id=f"P{i:06d}", first_name="Bench", last_name="Mark",
        email=f"bench{i}@example.org", phone_country_code="+1", phone_number="5550100001",
        gender="Female", dob="1970-01-01", ethnicity="NonHispanic", race="Caucasian",
        address_line1=f"{i} Main Street", city="Springfield", state="NY", postal_code="10007",
        country="US", order_items="GLCS;FCIT:2",
    )
    return row


def _cpu() -> float:
    """CPU seconds of this process (all its threads): the loader's own cost, not the sandbox's."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _start_sandbox(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "etl.cli", "sandbox", "--port", str(port)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the sandbox process exited")
        try:
            if httpx.get(f"{url}/_sandbox/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the sandbox did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--sample", type=int, default=100, help="orders in the sequential baseline")
    args = ap.parse_args()

    port = _free_port()
    sandbox = _start_sandbox(port)
    try:
        base = f"http://127.0.0.1:{port}"
        httpx.post(f"{base}/_sandbox/lgc/faults", json={"latency": args.latency}).raise_for_status()
        with tempfile.TemporaryDirectory(prefix="labsync-bench-") as tmp:
            settings = Settings(
                warehouse_url=f"sqlite:///{Path(tmp) / 'bench.db'}",
                retry=RetrySettings(max_attempts=6, initial_wait=0.1, max_wait=2.0, timeout=30),
            )
            lgc = replace(settings.lgc, base_url=f"{base}/lgc", rate_limit=0,
                          concurrency=args.concurrency)
            engine = warehouse.upgrade_url(settings.warehouse_url)

            fast = replace(settings, lgc=lgc)
            cpu0 = _cpu()
            started = time.perf_counter()
            batch = outbox.adhoc_batch(engine, "bench")
            outbox.write(engine, batch, (_row(i, "BENCH") for i in range(args.orders)),
                         vault=vault_for(settings.fernet_key, engine))  # sealed, as in production
            (chunk,) = outbox.chunks(engine, [batch], args.orders, max_attempts=fast.max_attempts)
            staged = time.perf_counter() - started
            summary = load_chunk(engine, fast, chunk, owner="cli:bench")
            elapsed = time.perf_counter() - started
            cpu = _cpu() - cpu0

            seq = replace(settings, lgc=replace(lgc, concurrency=1))
            s_started = time.perf_counter()
            s_summary = load_rows(engine, seq, (_row(i, "SEQ") for i in range(args.sample)))
            s_elapsed = time.perf_counter() - s_started
            engine.dispose()
    finally:
        sandbox.terminate()
        sandbox.wait(timeout=10)

    rate = args.orders / elapsed
    ideal = args.concurrency / args.latency
    s_rate = args.sample / s_elapsed
    counts = Counter(summary.counts)
    print(f"labsync load bench: {args.orders} orders, sandbox latency {args.latency * 1000:.0f} ms, "
          f"concurrency {args.concurrency}, rate limit off, SQLite warehouse, {os.cpu_count()} CPUs")
    print(f"  outcome:      {dict(counts)} (token fetched {summary.token_fetches}x)")
    print(f"  concurrent:   {elapsed:.2f}s -> {rate:.0f} orders/s (outbox written in {staged:.2f}s of it, "
          f"{staged / elapsed:.0%})")
    print(f"  loader CPU:   {cpu * 1000 / args.orders:.2f} ms per order ({cpu / elapsed:.0%} of one core "
          f"while loading; the sandbox runs in another process; load average "
          f"{os.getloadavg()[0]:.1f} at the end)")
    print(f"  ideal:        concurrency / latency = {ideal:.0f} orders/s -> ratio {rate / ideal:.2f} "
          f"(goal >= 0.90)")
    print(f"  sequential:   concurrency 1, measured on {args.sample} orders ({dict(s_summary.counts)}) "
          f"in {s_elapsed:.2f}s -> {s_rate:.1f} orders/s; extrapolated to {args.orders} orders: "
          f"{args.orders / s_rate:.0f}s")
    print(f"  speed-up:     {rate / s_rate:.1f}x over the sequential loop (goal >= 20x)")


if __name__ == "__main__":
    main()
