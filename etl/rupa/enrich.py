"""Rupa-linked order rows: fill missing patient fields from the warehouse's Rupa copy.

Why from the warehouse and not the API: validation runs on whole batches and must not depend on
Rupa being up; `labsync extract patients` keeps the copy current. Only blank cells are filled:
a value the program manager typed always wins. An id that is unknown (or marked deleted) is a
reject reason for that row, never a silent pass.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import pandas as pd
from sqlalchemy import Engine, select

from etl.warehouse import rupa_patients
from schemas.columns import RUPA_FILLABLE, RUPA_PATIENT_ID

LOOKUP_CHUNK = 500

RupaLookup = Callable[[list[str]], dict[str, dict]]


def make_rupa_lookup(engine: Engine) -> RupaLookup:
    """A function taking Rupa patient ids and returning {id: {first_name, last_name, email, dob}}
    for the ids that exist in `rupa_patients` and are not marked deleted. Keys are the CSV's
    column names (`dob` is Rupa's `birthday`, YYYY-MM-DD as the API gives it)."""

    def lookup(ids: list[str]) -> dict[str, dict]:
        wanted = sorted({str(i).strip() for i in ids if i is not None and str(i).strip()})
        out: dict[str, dict] = {}
        t = rupa_patients
        with engine.connect() as conn:
            for i in range(0, len(wanted), LOOKUP_CHUNK):
                chunk = wanted[i:i + LOOKUP_CHUNK]
                rows = conn.execute(
                    select(t.c.id, t.c.first_name, t.c.last_name, t.c.email, t.c.birthday)
                    .where(t.c.id.in_(chunk), t.c.deleted_at.is_(None)))
                for rid, first, last, email, birthday in rows:
                    out[rid] = {"first_name": first, "last_name": last, "email": email, "dob": birthday}
        return out

    return lookup


def unknown_id_reason(rupa_id: str) -> str:
    return (f"{RUPA_PATIENT_ID} {rupa_id!r} is not a known Rupa patient in the warehouse "
            "(check the id, or run `labsync extract patients` to refresh the copy)")


def _blank(value: object) -> bool:
    if value is None:
        return True
    try:
        if pd.isna(value):
            return True
    except (TypeError, ValueError):
        pass
    return isinstance(value, str) and not value.strip()


def enrich_frame(frame: pd.DataFrame, lookup: RupaLookup) -> tuple[pd.DataFrame, dict[Hashable, str]]:
    """A copy of `frame` with blank RUPA_FILLABLE cells filled for rows carrying a
    `rupa_patient_id`, and {row index: reason} for rows whose id is unknown. Rows without an id
    and frames without the column pass through untouched."""
    if RUPA_PATIENT_ID not in frame.columns:
        return frame, {}
    out = frame.copy()
    ids = out[RUPA_PATIENT_ID]
    linked = [idx for idx, v in ids.items() if not _blank(v)]
    if not linked:
        return out, {}
    found = lookup([str(ids[idx]).strip() for idx in linked])
    for col in RUPA_FILLABLE:
        if col not in out.columns:
            out[col] = pd.Series([None] * len(out), index=out.index, dtype=object)
        elif out[col].dtype != object:
            out[col] = out[col].astype(object)
    rejects: dict[Hashable, str] = {}
    for idx in linked:
        rid = str(ids[idx]).strip()
        person = found.get(rid)
        if person is None:
            rejects[idx] = unknown_id_reason(rid)
            continue
        for col in RUPA_FILLABLE:
            if _blank(out.at[idx, col]) and person.get(col):
                out.at[idx, col] = person[col]
    return out, rejects
