"""Rupa-linked order rows: the lookup that fills missing patient fields from the warehouse.

Why from the warehouse and not the API: validation runs on whole batches and must not depend on
Rupa being up; `labsync extract patients` keeps the copy current. The validator
(etl.intake.validate, `rupa_lookup=`) fills only blank cells, so a value the program manager
typed always wins, and rejects a row whose id is unknown (or marked deleted).
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine, select

from etl.warehouse import rupa_patients

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


def rupa_lookup_for(engine: Engine) -> RupaLookup:
    """Resolve rupa_patient_id against the warehouse's copy of Rupa patients (lazily imported so
    validation works without the Rupa module's dependencies)."""

    def lookup(ids: list[str]) -> dict[str, dict]:
        return make_rupa_lookup(engine)(ids)

    return lookup
