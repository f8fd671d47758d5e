"""Test helpers: a valid order row (the LGC seed's sample, valid NPI) and CSV writers."""

from __future__ import annotations

import csv
from pathlib import Path

from schemas.columns import COLUMNS

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def seed_row(**overrides) -> dict:
    """The first row of examples/orders.csv: the seed document's sample order."""
    with open(EXAMPLES / "orders.csv", encoding="utf-8", newline="") as f:
        row = next(csv.DictReader(f))
    row.update(overrides)
    return row


def write_csv(path: Path, rows: list[dict], *, columns: list[str] | None = None, bom: bool = False) -> Path:
    columns = columns or list(dict.fromkeys([*COLUMNS, *(k for r in rows for k in r)]))
    with open(path, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def read_rejects(path: Path) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as f:  # labsync writes a BOM (Excel)
        return list(csv.DictReader(f))
