"""Benchmark: Rupa sandbox patients extracted into SQLite AND PostgreSQL, at two page sizes.

For each size (default 20k and 200k patients) and page size (default 100 and 500) the DAG's
task function (`etl.airflow.tasks.rupa_extract`) runs in a fresh interpreter against a fresh SQLite file and a fresh
database on a throwaway PostgreSQL server (started the way tests/pgserver.py does, or
LABSYNC_TEST_POSTGRES_URL). Prints rows/s of each, the PostgreSQL/SQLite ratio (goal >= 0.9 at
every page size) and each child's peak RSS (read from `os.wait4`'s `ru_maxrss`). The sandbox
runs in its own process, so its memory is not counted. Flat memory: the largest size's peak
stays within 1.5x of the smallest's.

Before the timed runs one untimed extraction pages through each sandbox, so that in every timed
run alike its pages come from the JSON text it keeps (etl/sandbox/rupa.py `_Records.text`): the
sandbox shares this machine's cores with the extractor and PostgreSQL, where a real Rupa costs
them nothing. Rendering every page afresh took ~7 us of CPU a row, as much as the PostgreSQL
server's own work, on the 2 cores that PostgreSQL (and not SQLite, which runs inside the
extractor) has to share. For the same reason each run's database is dropped (its SQLite file
deleted) once timed: PostgreSQL's autovacuum and checkpoints of earlier runs' rows would
otherwise run during the later runs.

    .venv/bin/python bench/extract.py [--sizes 20000 200000] [--page-sizes 100 500] [--repeat 3]
                                      [--rerun]

`--rerun` also times a second extraction over the filled warehouse (every row unchanged).
Each figure is the median of `--repeat` runs (3), SQLite and PostgreSQL taking turns run after
run, so a busy moment of a shared machine falls on both. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "etl.cli", *args]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the sandbox process exited")
        try:
            if httpx.get(f"{url}/_sandbox/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit("the sandbox did not start")


class Sandbox:
    """`labsync sandbox` with n patients in its own process."""

    def __init__(self, n: int) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            _cli("sandbox", "--port", str(self.port), "--patients", str(n), "--lab-tests", "0"),
            cwd=REPO, env=_clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_healthy(self.url, self.proc)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def _clean_env() -> dict:
    env = dict(os.environ)
    for name in ("RUPA_API_TOKEN", "RUPA_CLIENT_ID", "RUPA_CLIENT_SECRET", "RUPA_AUTHORIZE_URL"):
        env.pop(name, None)
    return env


CHILD = r"""
import json, sys
from etl.settings import Settings
from etl.airflow.tasks import rupa_extract
print(json.dumps(rupa_extract("patients", Settings.from_env())))
"""


def _run_child(env: dict) -> dict:
    """One extraction, as the DAG task runs it, in a fresh interpreter; its summary and the
    child's own peak RSS."""
    with tempfile.TemporaryFile("w+") as errors:
        child = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=errors, text=True)
        out = child.stdout.read() if child.stdout else ""
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not a running max
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            errors.seek(0)
            raise SystemExit(f"extract exited {child.returncode}: {errors.read().strip()[-500:]}")
    summary = json.loads(out.strip().splitlines()[-1])
    rows = summary["inserted"] + summary["updated"] + summary["unchanged"]
    return {"rows": rows, "pages": summary["pages"], "seconds": summary["seconds"],
            "rows_per_s": rows / summary["seconds"], "peak_rss_mb": usage.ru_maxrss / 1024}


def run_one(sandbox: Sandbox, warehouse_url: str, page_size: int, rerun: bool) -> dict:
    from etl.vault import new_key

    env = {**_clean_env(), "RUPA_BASE_URL": f"{sandbox.url}/rupa", "RUPA_PAGE_SIZE": str(page_size),
           "LABSYNC_WAREHOUSE_URL": warehouse_url, "LABSYNC_FERNET_KEY": new_key()}
    subprocess.run(_cli("db", "upgrade"), cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    # the practitioner's consent, done by httpx: read the code from the redirect
    consent = httpx.get(f"{sandbox.url}/rupa/oauth/authorize?" + urlencode({
        "client_id": "sandbox-client", "redirect_uri": "http://127.0.0.1:8765/oauth/callback",
        "response_type": "code"}))
    code = parse_qs(urlsplit(consent.headers["location"]).query)["code"][0]
    subprocess.run(_cli("rupa", "authorize", "--code", code), cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = _run_child(env)
    if rerun:
        again = _run_child(env)
        result["rerun_rows_per_s"] = again["rows_per_s"]
    return result


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    ap.add_argument("--page-sizes", type=int, nargs="+", default=[100, 500])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rerun", action="store_true", help="also time a re-run (every row unchanged)")
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    args = ap.parse_args()

    from tests.pgserver import PgServer, create_database, drop_database

    server = None
    admin = os.environ.get("LABSYNC_TEST_POSTGRES_URL")
    if "postgresql" in args.backends and not admin:
        server = PgServer().start()
        admin = server.admin_url
    peaks: dict[int, float] = {}
    ratios: dict[int, list[float]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="labsync-bench-") as tmp:
            for n in args.sizes:
                sandbox = Sandbox(n)
                try:
                    run_one(sandbox, f"sqlite:///{Path(tmp) / f'warm_{n}.db'}", max(args.page_sizes), False)
                    for page_size in args.page_sizes:
                        got: dict[str, list[dict]] = {backend: [] for backend in args.backends}
                        for i in range(args.repeat):  # the backends take turns: a busy moment hits both
                            for backend in args.backends:
                                db = Path(tmp) / f"bench_{n}_{page_size}_{i}.db"
                                url = f"sqlite:///{db}" if backend == "sqlite" else create_database(admin)
                                got[backend].append(run_one(sandbox, url, page_size, args.rerun))
                                # gone before the next run: no autovacuum or checkpoint of an
                                # earlier run's 200k rows competes with a later run for the cores
                                if backend == "sqlite":
                                    for leftover in Path(tmp).glob(f"{db.name}*"):
                                        leftover.unlink()
                                else:
                                    drop_database(url)
                        for backend in args.backends:
                            runs = got[backend]
                            rerun = (f", re-run {_median(runs, 'rerun_rows_per_s'):>8,.0f} rows/s"
                                     if args.rerun else "")
                            print(f"{n:>8} patients, page {page_size:>4}, {backend:<10}: "
                                  f"{_median(runs, 'rows_per_s'):>8,.0f} rows/s "
                                  f"({_median(runs, 'seconds'):.1f}s, {runs[0]['pages']} pages){rerun}, "
                                  f"peak RSS {max(r['peak_rss_mb'] for r in runs):.1f} MiB", flush=True)
                            peaks[n] = max(peaks.get(n, 0.0), *(r["peak_rss_mb"] for r in runs))
                        if {"sqlite", "postgresql"} <= set(got):
                            ratio = _median(got["postgresql"], "rows_per_s") / _median(got["sqlite"], "rows_per_s")
                            ratios.setdefault(page_size, []).append(ratio)
                            extra = ""
                            if args.rerun:
                                r2 = (_median(got["postgresql"], "rerun_rows_per_s")
                                      / _median(got["sqlite"], "rerun_rows_per_s"))
                                extra = f"; re-run {r2:.2f}"
                            print(f"{n:>8} patients, page {page_size:>4}: PostgreSQL / SQLite = {ratio:.2f}"
                                  f"{extra} (goal >= 0.9)", flush=True)
                finally:
                    sandbox.close()
    finally:
        if server is not None:
            server.stop()
    for page_size, rs in ratios.items():
        print(f"page {page_size}: PostgreSQL / SQLite lowest ratio {min(rs):.2f} (goal >= 0.9)")
    if len(peaks) >= 2:
        lo, hi = min(peaks), max(peaks)
        print(f"peak RSS {hi} / {lo}: {peaks[hi] / peaks[lo]:.2f}x (flat memory: <= 1.5x)")


if __name__ == "__main__":
    main()
