"""Benchmark: Rupa sandbox patients extracted into SQLite, rows/s and peak RSS at two sizes.

Why subprocesses: peak RSS is a per-process high-water mark, so each size runs the real CLI
(`labsync extract patients`) in a fresh interpreter and reads that child's `ru_maxrss` from
`os.wait4`. The sandbox runs in its own process too (`labsync sandbox`), so its memory is not
counted. Flat memory means the 200k peak stays within 1.5x of the 20k peak.

    .venv/bin/python bench/extract.py [--sizes 20000 200000] [--page-size 500]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx

REPO = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(r"patients: (\d+) inserted, (\d+) updated, (\d+) unchanged.*\((\d+) pages in ([\d.]+)s")


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


def run_size(n: int, page_size: int, workdir: Path) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RUPA_BASE_URL": f"{url}/rupa", "RUPA_PAGE_SIZE": str(page_size),
           "LABSYNC_WAREHOUSE_URL": f"sqlite:///{workdir / f'bench_{n}.db'}"}
    for name in ("RUPA_API_TOKEN", "RUPA_CLIENT_ID", "RUPA_CLIENT_SECRET", "RUPA_AUTHORIZE_URL"):
        env.pop(name, None)
    sandbox = subprocess.Popen(_cli("sandbox", "--port", str(port), "--patients", str(n), "--lab-tests", "0"),
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_healthy(url, sandbox)
        # the practitioner's consent, done by httpx: read the code from the redirect
        redirect_uri = "http://127.0.0.1:8765/oauth/callback"
        consent = httpx.get(f"{url}/rupa/oauth/authorize?" + urlencode({
            "client_id": "sandbox-client", "redirect_uri": redirect_uri, "response_type": "code"}))
        code = parse_qs(urlsplit(consent.headers["location"]).query)["code"][0]
        subprocess.run(_cli("rupa", "authorize", "--code", code), cwd=REPO, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        child = subprocess.Popen(_cli("extract", "patients", "--no-progress"), cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        out = child.stdout.read() if child.stdout else ""
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise SystemExit(f"extract exited {child.returncode}")
    finally:
        sandbox.terminate()
        sandbox.wait(timeout=10)
    m = SUMMARY.search(out)
    if not m:
        raise SystemExit(f"no summary line in: {out!r}")
    rows = int(m.group(1)) + int(m.group(2)) + int(m.group(3))
    seconds = float(m.group(5))
    return {"size": n, "rows": rows, "pages": int(m.group(4)), "seconds": seconds,
            "rows_per_s": rows / seconds if seconds else float("inf"),
            "peak_rss_mb": usage.ru_maxrss / 1024}  # Linux reports KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    ap.add_argument("--page-size", type=int, default=500)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="labsync-bench-") as tmp:
        for n in args.sizes:
            r = run_size(n, args.page_size, Path(tmp))
            results.append(r)
            print(f"{r['size']:>8} patients: {r['rows']} rows in {r['seconds']:.1f}s "
                  f"({r['rows_per_s']:,.0f} rows/s, {r['pages']} pages of {args.page_size}), "
                  f"peak RSS {r['peak_rss_mb']:.1f} MiB", flush=True)
    if len(results) >= 2:
        ratio = results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"]
        print(f"peak RSS {results[-1]['size']} / {results[0]['size']}: {ratio:.2f}x (flat memory: <= 1.5x)")


if __name__ == "__main__":
    main()
