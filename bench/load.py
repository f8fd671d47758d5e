"""Benchmark: LetsGetChecked orders loaded into the sandbox at 50 ms latency per request, at
concurrency 8, 20, 50 and 100, against the ideal concurrency / latency, with the loader's CPU
per order, the code of today next to the code before issue 22 (whose home-made HTTP/1.1 transport,
etl/wire.py, carried the PUTs; today httpx's own transport does) in the same run.

For each concurrency, each code version loads about `--seconds` worth of ideal throughput
(concurrency / latency x seconds orders, at least 400; 10 s by default, so that the load's
start, a token fetch and the first claim, ~0.1 s, weighs 1 %, not 3 %) in a process of its own: it stages the
orders in a SQLite outbox (sealed, as `prepare` does; timed apart), then `load_chunk` reads,
claims, sends and records them. The figures are the load's: orders/s, the ratio to concurrency
/ latency (goals >= 0.9, 0.9, 0.85, 0.8), and CPU ms per order of the loader process (getrusage
around the load, every thread: the event loop and the warehouse thread). The sandbox runs in
one more process, so its CPU is not the loader's; its CPU per order is printed too, because on a
small machine the two share the cores (2 here) and a busy sandbox slows the answers down. The
"1-core ceiling" is the orders/s one core could carry at that CPU per order: the most one loader
process can send whatever the latency, as long as the machine gives it a whole core.

The baseline is the same loader at commit `--baseline` (default: main before this work), taken
from git (`git archive`) into a temp dir and run by the same interpreter against the same
sandbox; without git, or with `--baseline ''`, only today's code runs. The speed-up over a
sequential loop (concurrency 1, timed on `--sample` orders) is printed last.

    .venv/bin/python bench/load.py [--latency 0.05] [--seconds 10] [--concurrency 8,20,50,100]
                                   [--baseline f9d9392] [--repeat 1]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
BASELINE = "f9d9392"  # main before issue 22: the home-made transport (etl/wire.py) carried the PUTs
GOALS = {8: 0.9, 20: 0.9, 50: 0.85, 100: 0.8}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _row(i: int, prefix: str) -> dict:
    from schemas.columns import COLUMNS

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


def _proc_cpu(pid: int) -> float:
    """CPU seconds of another process (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


# ---- one load, in a process of its own ------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    """Stage and load `args.orders` orders with the code in `args.code`; print one JSON line."""
    sys.path.insert(0, args.code)
    import importlib
    from dataclasses import replace

    from etl import warehouse
    from etl.settings import RetrySettings, Settings

    # the order pipeline moved from etl/lgc/ to etl/orders/ (issue 22); a baseline may predate it
    flows = "etl.orders" if (Path(args.code) / "etl" / "orders" / "load.py").exists() else "etl.lgc"
    outbox = importlib.import_module(f"{flows}.outbox")
    load_chunk = importlib.import_module(f"{flows}.load").load_chunk
    from etl.vault import vault_for

    with tempfile.TemporaryDirectory(prefix="labsync-bench-") as tmp:
        settings = Settings(
            warehouse_url=f"sqlite:///{Path(tmp) / 'bench.db'}",
            retry=RetrySettings(max_attempts=6, initial_wait=0.1, max_wait=2.0, timeout=30),
        )
        lgc = replace(settings.lgc, base_url=f"{args.base}/lgc", rate_limit=0, concurrency=int(args.concurrency))
        settings = replace(settings, lgc=lgc)
        engine = warehouse.upgrade_url(settings.warehouse_url)
        started = time.perf_counter()
        batch = outbox.adhoc_batch(engine, "bench")
        outbox.write(engine, batch, (_row(i, args.prefix) for i in range(args.orders)),
                     vault=vault_for(settings.fernet_key, engine))  # sealed, as in production
        (chunk,) = outbox.chunks(engine, [batch], args.orders, max_attempts=settings.max_attempts)
        staged = time.perf_counter() - started
        cpu0, t0 = _cpu(), time.perf_counter()
        summary = load_chunk(engine, settings, chunk, owner="cli:bench")
        elapsed, cpu = time.perf_counter() - t0, _cpu() - cpu0
        engine.dispose()
    import etl

    print(json.dumps({"elapsed": elapsed, "cpu": cpu, "staged": staged, "etl": etl.__file__,
                      "counts": {str(k): v for k, v in summary.counts.items()}}))


def _run(code: str, base: str, concurrency: int, orders: int, prefix: str, sandbox_pid: int) -> dict:
    s0 = _proc_cpu(sandbox_pid)
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--code", code, "--base", base, "--prefix", prefix,
         "--concurrency", str(concurrency), "--orders", str(orders)],
        cwd=REPO, capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"the loader process failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(result["etl"]).resolve().is_relative_to(Path(code).resolve()):
        raise SystemExit(f"the loader ran {result['etl']}, not the code in {code}")
    result["sandbox_cpu"] = _proc_cpu(sandbox_pid) - s0  # includes the stage's few requests
    return result


def _baseline_tree(rev: str, into: Path) -> str | None:
    """The etl and schemas packages at `rev`, unpacked into `into`; None without git or rev."""
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev, "etl", "schemas"],
                                 capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    tar_path = into / "baseline.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")
    return str(into)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--seconds", type=float, default=10.0, help="ideal load time per run")
    ap.add_argument("--concurrency", default="8,20,50,100")
    ap.add_argument("--baseline", default=BASELINE, help="git revision to compare with ('' for none)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per version and concurrency (best kept)")
    ap.add_argument("--sample", type=int, default=50, help="orders in the sequential baseline")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--code", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--prefix", help=argparse.SUPPRESS)
    ap.add_argument("--orders", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]

    port = _free_port()
    sandbox = _start_sandbox(port)
    base = f"http://127.0.0.1:{port}"
    rows: list[tuple] = []
    try:
        httpx.post(f"{base}/_sandbox/lgc/faults", json={"latency": args.latency}).raise_for_status()
        with tempfile.TemporaryDirectory(prefix="labsync-bench-code-") as tmp:
            old = _baseline_tree(args.baseline, Path(tmp)) if args.baseline else None
            versions = [("today", str(REPO))] + ([(args.baseline, old)] if old else [])
            for c in levels:
                orders = max(400, round(c / args.latency * args.seconds))
                for name, code in versions:
                    best = None
                    for k in range(args.repeat):
                        r = _run(code, base, c, orders, f"{name}-{c}-{k}", sandbox.pid)
                        if best is None or r["elapsed"] < best["elapsed"]:
                            best = r
                    rows.append((c, name, orders, best))
            seq = _run(str(REPO), base, 1, args.sample, "seq", sandbox.pid)
    finally:
        sandbox.terminate()
        sandbox.wait(timeout=10)

    print(f"labsync load bench: sandbox latency {args.latency * 1000:.0f} ms, rate limit off, SQLite "
          f"warehouse, {os.cpu_count()} CPUs shared with the sandbox process; load average "
          f"{os.getloadavg()[0]:.1f} at the end; baseline: "
          f"{args.baseline if len(versions) > 1 else 'not measured (no git revision ' + repr(args.baseline) + ')'}")
    print(f"  {'conc':>4} {'code':>8} {'orders':>6} {'orders/s':>9} {'ideal':>6} {'ratio':>6} {'goal':>5} "
          f"{'loader CPU ms/order':>19} {'1-core ceiling/s':>16} {'sandbox CPU ms/order':>20}  outcome")
    by = {(c, n): r for c, n, _, r in rows}
    for c, name, orders, r in rows:
        rate = orders / r["elapsed"]
        ideal = c / args.latency
        print(f"  {c:>4} {name:>8} {orders:>6} {rate:>9.0f} {ideal:>6.0f} {rate / ideal:>6.2f} "
              f"{GOALS.get(c, 0):>5.2f} {r['cpu'] * 1000 / orders:>19.3f} {orders / r['cpu']:>16.0f} "
              f"{r['sandbox_cpu'] * 1000 / orders:>20.3f}  {r['counts']}")
    for c in levels:
        new, old = by.get((c, "today")), by.get((c, args.baseline))
        if new and old:
            print(f"  concurrency {c}: CPU per order {new['cpu'] / old['cpu']:.2f}x the baseline's, "
                  f"orders/s {old['elapsed'] / new['elapsed']:.2f}x")
    s_rate = args.sample / seq["elapsed"]
    c_top, orders_top, r_top = max(((c, o, r) for c, n, o, r in rows if n == "today"), key=lambda x: x[0])
    print(f"  sequential: concurrency 1 on {args.sample} orders: {s_rate:.1f} orders/s; concurrency "
          f"{c_top} is {orders_top / r_top['elapsed'] / s_rate:.1f}x that (goal >= 20x)")

if __name__ == "__main__":
    main()
