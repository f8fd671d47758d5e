"""Benchmark: Rupa order intents (`labsync intents`) against the sandbox at 50 ms latency.

A file of N rows (half with a known rupa_patient_id: one request each; half with name + email:
POST /patients then POST /order_intents) is validated, cross-checked against the warehouse and
sent. Prints rows/s at RUPA_CONCURRENCY 1 and at the chosen concurrency, the speed-up (the
baseline is the concurrency-1 run in this same process, on its own fresh warehouse) and the
ratio to the ideal (concurrency / (requests per row x latency)).

The sandbox runs in its own process (`labsync sandbox`); the warehouse is SQLite in a temp dir.

    .venv/bin/python bench/intents.py [--rows 400] [--concurrency 4] [--latency 0.05]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from etl import warehouse  # noqa: E402
from etl.checkout.intents import process_intents_file  # noqa: E402
from etl.extract.streams import extract_all  # noqa: E402
from etl.settings import RetrySettings, Settings  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(path: Path, rows: int, prefix: str) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row_id", "rupa_patient_id", "first_name", "last_name", "email", "lab_test_ids", "return_url"])
        for i in range(rows):
            if i % 2:
                w.writerow([f"{prefix}-{i}", f"pat_{i % 500:07d}", "", "", "", "labts_0000001", "https://a.example/r"])
            else:
                w.writerow([f"{prefix}-{i}", "", "Bench", f"Mark{i}", f"bench{i}@example.test",
                            "labts_0000002;labts_0000003", "https://a.example/r"])


def _run(base_url: str, token: str, rows: int, concurrency: int, tmp: Path) -> tuple[float, dict]:
    url = f"sqlite:///{tmp / f'c{concurrency}.db'}"
    d = Settings()
    settings = replace(d, warehouse_url=url, rupa=replace(d.rupa, base_url=base_url, api_token=token,
                                                          concurrency=concurrency),
                       retry=RetrySettings(max_attempts=6, initial_wait=0.05, max_wait=1.0, timeout=30))
    engine = warehouse.connect(url)
    extract_all(engine, settings)
    path = tmp / f"intents-c{concurrency}.csv"
    _write(path, rows, f"C{concurrency}")
    t0 = time.perf_counter()
    out = process_intents_file(engine, settings, path)
    return time.perf_counter() - t0, out.counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--latency", type=float, default=0.05)
    args = ap.parse_args()
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    sandbox = subprocess.Popen([sys.executable, "-m", "etl.cli", "sandbox", "--port", str(port),
                                "--patients", "500", "--lab-tests", "20"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                httpx.get(f"{base}/_sandbox/health")
                break
            except httpx.TransportError:
                time.sleep(0.1)
        # a ready token, as RUPA_API_TOKEN would hold (the sandbox's OAuth flow, done by httpx)
        red = httpx.get(f"{base}/rupa/oauth/authorize", params={
            "client_id": "sandbox-client", "response_type": "code", "redirect_uri": f"{base}/cb"})
        code = red.headers["location"].split("code=")[1].split("&")[0]
        token = httpx.post(f"{base}/rupa/oauth/token", data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": f"{base}/cb",
            "client_id": "sandbox-client", "client_secret": "sandbox-secret"}).json()["access_token"]
        httpx.post(f"{base}/_sandbox/rupa/faults", json={"latency": args.latency})
        requests_per_row = 1.5  # half the rows also create their patient
        with tempfile.TemporaryDirectory() as tmp:
            one, counts1 = _run(f"{base}/rupa", token, args.rows, 1, Path(tmp))
            many, counts = _run(f"{base}/rupa", token, args.rows, args.concurrency, Path(tmp))
        ideal = args.concurrency / (requests_per_row * args.latency)
        print(f"intents: {args.rows} rows at {args.latency * 1000:.0f} ms latency")
        print(f"  concurrency 1:  {args.rows / one:7.1f} rows/s ({one:.1f}s) {dict(counts1)}")
        print(f"  concurrency {args.concurrency}:  {args.rows / many:7.1f} rows/s ({many:.1f}s) {dict(counts)}")
        print(f"  speed-up {one / many:.2f}x over concurrency 1; {args.rows / many / ideal:.2f} of the ideal "
              f"{ideal:.0f} rows/s (validation and warehouse included)")
    finally:
        sandbox.terminate()
        sandbox.wait(timeout=10)


if __name__ == "__main__":
    main()
