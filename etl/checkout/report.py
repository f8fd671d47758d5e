"""The checkout report of an order-intents file: FILE.summary.html (per row the patient and a
clickable checkout link for the practitioner, rejected rows with their reasons) and
FILE.checkout.csv (the links), written beside the file from the ledger `rupa_order_intents`.

Both hold patient names, as the CSV itself does; nothing here logs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import Engine

from etl.intake import csvsafe, summary
from etl.intake.validate import rejects_path_for
from etl.states import BatchStatus
from etl.warehouse import rupa_order_intents, rupa_patients

t = rupa_order_intents
LOOKUP_CHUNK = 500
CHECKOUT_COLUMNS = ("line", "row_id", "patient", "rupa_patient_id", "state", "checkout_url", "note")
RESENT = "re-sent after an unknown outcome"

# outcomes of one run, per row (the report's and the CLI's counts)
CREATED, ALREADY, REJECTED, FAILED, UNKNOWN, BUSY = (
    "created", "already created", "rejected by Rupa", "failed", "unknown outcome", "busy")
BAD_OUTCOMES = (REJECTED, FAILED, UNKNOWN, BUSY)


@dataclass
class IntentsOutcome:
    """PHI-free: fit for XCom and the CLI."""

    name: str
    batch_id: int | None
    status: str
    total_rows: int = 0
    valid_rows: int = 0
    rejected_rows: int = 0
    counts: dict = field(default_factory=dict)
    resent: int = 0
    summary_path: str | None = None
    checkout_path: str | None = None
    rejects_path: str | None = None
    error: str | None = None

    @property
    def exit_code(self) -> int:
        if self.status == BatchStatus.UNUSABLE:
            return 2
        bad = self.rejected_rows or any(self.counts.get(k) for k in BAD_OUTCOMES)
        return 1 if bad else 0

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}

    def line(self) -> str:
        parts = [f"{k} {v}" for k, v in self.counts.items() if v]
        if self.rejected_rows:
            parts.append(f"rejected before sending {self.rejected_rows}")
        if self.resent:
            parts.append(f"{RESENT} {self.resent} (may have left a second, unused cart at Rupa)")
        return f"{self.name}: {self.status}" + (f" ({', '.join(parts)})" if parts else "")


def summary_path_for(path: Path) -> Path:
    return path.with_name(f"{path.stem}.summary.html")


def checkout_path_for(path: Path) -> Path:
    return path.with_name(f"{path.stem}.checkout.csv")


def ledger_rows(engine: Engine, row_ids: Sequence[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    ids = list(dict.fromkeys(row_ids))
    with engine.connect() as conn:
        for i in range(0, len(ids), LOOKUP_CHUNK):
            for r in conn.execute(sa.select(t).where(t.c.row_id.in_(ids[i:i + LOOKUP_CHUNK]))).mappings():
                out[r["row_id"]] = dict(r)
    return out


def _patient_names(engine: Engine, ids: Iterable[str | None]) -> dict[str, str]:
    wanted = sorted({i for i in ids if i})
    out: dict[str, str] = {}
    with engine.connect() as conn:
        for i in range(0, len(wanted), LOOKUP_CHUNK):
            for pid, first, last in conn.execute(sa.select(
                    rupa_patients.c.id, rupa_patients.c.first_name, rupa_patients.c.last_name)
                    .where(rupa_patients.c.id.in_(wanted[i:i + LOOKUP_CHUNK]))):
                out[pid] = " ".join(p for p in (first, last) if p)
    return out


def checkout_rows(engine: Engine, seen: Sequence[tuple[int | None, str]],
                  names: Mapping[str, str] | None = None) -> list[dict]:
    """Per valid row of a file: line, row id, patient, Rupa patient id, state and checkout link."""
    ledger = ledger_rows(engine, [rid for _, rid in seen])
    known = _patient_names(engine, (r.get("patient_id") for r in ledger.values()))
    out = []
    for line, rid in seen:
        r = ledger.get(rid, {})
        pid = r.get("patient_id")
        note = r.get("last_error") or ""
        if r.get("resends"):
            note = (note + "; " if note else "") + (
                f"sent {r['resends'] + 1} times after unknown outcomes: Rupa may hold an extra, unused cart")
        out.append({"line": line, "row_id": rid, "patient": (names or {}).get(rid) or (known.get(pid, "") if pid else ""),
                    "rupa_patient_id": pid or "", "state": r.get("state", ""),
                    "checkout_url": r.get("checkout_url") or "", "order_id": r.get("order_id") or "",
                    "note": note})
    return out


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Mapping]) -> Path:
    """A UTF-8 (BOM) CSV through the house's formula-safe writer (etl.intake.csvsafe)."""
    return csvsafe.write_rows(path, header, ([r.get(c) for c in header] for r in rows), bom=True)


def write_report(engine: Engine, path: Path, outcome: IntentsOutcome,
                 seen: Sequence[tuple[int | None, str]], names: Mapping[str, str]) -> None:
    rows = checkout_rows(engine, seen, names)
    links = write_csv(checkout_path_for(path), CHECKOUT_COLUMNS, rows)
    counts = dict(outcome.counts)
    if outcome.resent:
        counts[RESENT] = outcome.resent
    counts["rejected before sending"] = outcome.rejected_rows
    ok = outcome.exit_code == 0
    text = ("Every cart is ready: send each practitioner to its checkout link." if ok
            else "Some rows did not become carts; see below.")
    page = summary.render(
        file_name=path.name, title="Rupa order intents",
        outcome=f"{text} {outcome.valid_rows} of {outcome.total_rows} rows were valid.",
        counts=counts, rejected=_read_rejects(rejects_path_for(path)), checkout=rows, id_label="row_id",
        note=f"The links are also in {links.name}.")
    summary.write(summary_path_for(path), page)
    outcome.summary_path, outcome.checkout_path = str(summary_path_for(path)), str(links)


def _read_rejects(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [{**r, "client_order_id": r.get("row_id")} for r in csvsafe.read_rows(path)]
