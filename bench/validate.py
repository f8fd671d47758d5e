"""Validation speed: a generated 100,000-row order batch (1 % of rows broken), validated with
`etl.batches.validate`, against plain `pandas.read_csv` of the same file in the same run.

Prints rows/s, the ratio validate / read_csv (goal: <= 3x) and peak RSS of each step, measured
in fresh subprocesses so one step's memory does not hide the other's.
Usage: python bench/validate.py [ROWS]
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STEP = r"""
import json, resource, sys, time
path, step = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
import pandas as pd
from etl.batches.validate import validate_file
imported = time.perf_counter() - t0
t0 = time.perf_counter()
if step == "read_csv":
    rows = len(pd.read_csv(path))
else:
    rows = validate_file(path, chunk_rows=20_000).total_rows
seconds = time.perf_counter() - t0
print(json.dumps({"rows": rows, "seconds": seconds, "import_seconds": imported,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def generate(path: Path, rows: int) -> None:
    from tests.helpers import seed_row

    base = seed_row()
    columns = list(base)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for i in range(rows):
            row = dict(base, client_order_id=f"BENCH-{i:07d}", participant_id=f"P{i}",
                       phone_number=f"555{i:07d}"[:10], postal_code=f"{i % 99999:05d}")
            if i % 100 == 7:
                row["address_line1"] = "X" * 40  # 1 % broken
            w.writerow(row[c] for c in columns)


def run(path: Path, step: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STEP, str(path), step], check=True,
                         capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.csv"
        t = time.perf_counter()
        generate(path, rows)
        print(f"generated {rows:,} rows ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t:.1f}s")
        base = run(path, "read_csv")
        val = run(path, "validate")
    print(f"pandas.read_csv : {base['seconds']:.2f}s  {rows / base['seconds']:>10,.0f} rows/s  peak RSS {base['peak_rss_mb']:.0f} MB")
    print(f"labsync validate: {val['seconds']:.2f}s  {rows / val['seconds']:>10,.0f} rows/s  peak RSS {val['peak_rss_mb']:.0f} MB")
    print(f"ratio validate / read_csv: {val['seconds'] / base['seconds']:.2f}x  (goal <= 3x)")
    print(f"(timed after imports; importing pandas + pandera + labsync takes {val['import_seconds']:.2f}s once per process)")


if __name__ == "__main__":
    main()
