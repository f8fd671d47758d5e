"""Validation speed and memory: generated order batches (1 % of rows broken) validated by
`labsync validate`, against what a user could run instead, each in a fresh process, in one run.

Whole-process wall time (interpreter start, imports, reading, checking) of:
- `labsync validate FILE --no-record`     (every rule, line numbers, a reason per cell)
- a plain pandera model of the main rules  (`pandas.read_csv` + ~30 lines; no line numbers)
- `pandas.read_csv(FILE)`                  (reading only)
- `pyarrow.csv.read_csv(FILE)`             (reading only)
- `python -c pass`                         (the interpreter alone)

Goals: labsync <= 1.0x the pandera model and <= 3x `read_csv`; peak RSS (each child's own
`ru_maxrss`, via `os.wait4`) flat in the file's size: the largest size <= 1.1x the smallest.
The comparisons run at the first size; the other sizes run labsync only (`--compare-all` for all).

    .venv/bin/python bench/validate.py [--sizes 100000 1000000] [--repeat 5] [--compare-all]

Each time is the median of `--repeat` runs, the steps taking turns (one run of each, then the
next round), so a busy moment of a shared machine falls on all of them. Prints figures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# What a user would write in half an hour: read everything as text, check the main rules.
PANDERA_MODEL = r"""
import sys
import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series
from schemas.vocab import ETHNICITIES, GENDERS, RACES, STATES

class Orders(pa.DataFrameModel):
    client_order_id: Series[str] = pa.Field(unique=True, str_length={"max_value": 100})
    program_code: Series[str]
    participant_id: Series[str]
    first_name: Series[str]
    last_name: Series[str]
    email: Series[str] = pa.Field(nullable=True, str_matches=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
    phone_country_code: Series[str] = pa.Field(str_matches=r"^\+\d{1,4}$")
    phone_number: Series[str] = pa.Field(str_matches=r"^\d{4,15}$")
    gender: Series[str] = pa.Field(isin=list(GENDERS))
    dob: Series[str] = pa.Field(str_matches=r"^\d{4}-\d{2}-\d{2}$")
    ethnicity: Series[str] = pa.Field(isin=list(ETHNICITIES))
    race: Series[str] = pa.Field(isin=list(RACES))
    address_line1: Series[str] = pa.Field(str_length={"max_value": 35})
    address_line2: Series[str] = pa.Field(nullable=True, str_length={"max_value": 35})
    city: Series[str]
    state: Series[str] = pa.Field(nullable=True, isin=list(STATES))
    postal_code: Series[str]
    order_items: Series[str] = pa.Field(str_matches=r"^[^:;\s]+(:\d+)?(;[^:;\s]+(:\d+)?)*$")

    class Config:
        strict = False

frame = pd.read_csv(sys.argv[1], dtype=str, skipinitialspace=True)
try:
    Orders.validate(frame, lazy=True)
    failures = 0
except pa.errors.SchemaErrors as exc:
    failures = len(exc.failure_cases)
print(len(frame), failures)
"""

STEPS: dict[str, list[str]] = {
    "labsync validate": [sys.executable, "-m", "etl.cli", "validate", "{path}", "--no-record"],
    "pandera model": [sys.executable, "-c", PANDERA_MODEL, "{path}"],
    "pandas.read_csv": [sys.executable, "-c", "import sys, pandas; pandas.read_csv(sys.argv[1])", "{path}"],
    "pyarrow.csv": [sys.executable, "-c", "import sys, pyarrow.csv; pyarrow.csv.read_csv(sys.argv[1])", "{path}"],
    "python -c pass": [sys.executable, "-c", "pass"],
}


def generate(path: Path, rows: int) -> None:
    """A realistic batch: the seed order with varying ids, phones and ZIP codes; 1 % of the rows
    have an address line that is too long, and one row in 50 has a quoted address with a comma."""
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
            if i % 50 == 3:
                row["address_line2"] = "Apt 4, Floor 2"  # a quoted cell
            w.writerow(row[c] for c in columns)


def run(step: str, path: Path) -> dict:
    """One fresh process: its wall time and its own peak RSS."""
    cmd = [a.replace("{path}", str(path)) for a in STEPS[step]]
    with tempfile.TemporaryFile("w+") as errors:
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage
        seconds = time.perf_counter() - t0
        errors.seek(0)
        err = errors.read()
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1) or (code == 1 and step != "labsync validate"):
        raise SystemExit(f"{step} exited {code}: {err.strip()[-500:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


def measure(steps: list[str], path: Path, repeat: int) -> dict[str, dict]:
    """Each step `repeat` times, the steps taking turns (round after round), so that a slow
    moment of a shared machine falls on all of them alike; the median time of each, and its
    largest peak RSS."""
    runs: dict[str, list[dict]] = {step: [] for step in steps}
    for _ in range(repeat):
        for step in steps:
            runs[step].append(run(step, path))
    return {step: {"seconds": statistics.median(r["seconds"] for r in rs),
                   "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)} for step, rs in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--compare-all", action="store_true", help="run the comparisons at every size")
    args = ap.parse_args()
    peaks: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="labsync-bench-") as tmp:
        for k, rows in enumerate(args.sizes):
            path = Path(tmp) / f"bench_{rows}.csv"
            t = time.perf_counter()
            generate(path, rows)
            print(f"== {rows:,} rows ({path.stat().st_size / 1e6:.0f} MB, generated in "
                  f"{time.perf_counter() - t:.1f}s); whole-process wall time, median of {args.repeat}")
            steps = list(STEPS) if (k == 0 or args.compare_all) else ["labsync validate"]
            got = measure(steps, path, args.repeat)
            for step, r in got.items():
                print(f"  {step:<17} {r['seconds']:6.2f}s {rows / r['seconds']:>10,.0f} rows/s  "
                      f"peak RSS {r['peak_rss_mb']:6.0f} MiB", flush=True)
            peaks[rows] = got["labsync validate"]["peak_rss_mb"]
            ours = got["labsync validate"]["seconds"]
            if "pandera model" in got:
                print(f"  labsync / pandera model: {ours / got['pandera model']['seconds']:.2f}x (goal <= 1.0x)")
                print(f"  labsync / pandas.read_csv: {ours / got['pandas.read_csv']['seconds']:.2f}x (goal <= 3x)")
                print(f"  labsync / pyarrow.csv: {ours / got['pyarrow.csv']['seconds']:.2f}x")
    if len(peaks) >= 2:
        lo, hi = min(peaks), max(peaks)
        print(f"labsync peak RSS {hi:,} rows / {lo:,} rows: {peaks[hi] / peaks[lo]:.2f}x "
              f"({peaks[hi]:.0f} / {peaks[lo]:.0f} MiB; goal <= 1.1x)")


if __name__ == "__main__":
    main()
