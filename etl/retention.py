"""Retention and purge: each class of PHI labsync keeps is dropped once it is older than its
retention (LABSYNC_RETENTION_<CLASS>_DAYS, etl.settings.RetentionSettings) and nothing needs it
any more. `labsync purge` and the labsync_retention DAG call `purge`.

    class             what goes                                         what is never touched
    webhook_bodies    raw bodies of applied events (and of ignored      events still to apply
                      ones whose delivery was authenticated): emptied,  (received, failed); the
                      the row and its sha256 kept (a repeat delivery    row itself
                      is still a duplicate)
    result_documents  result JSON / HL7 bytes (LetsGetChecked) and      a result whose HL7 is not
                      the values read from them (lgc_result_values,     downloaded yet; a Rupa test
                      lab_observations); Rupa result files' bytes.      with a download pending
                      Rows, sizes and sha256 stay
    rejected_values   rejected cells kept in the warehouse              batches not finished
                                                                        (received, validated,
                                                                        incomplete)
    outbox_bodies     order bodies of settled outbox rows               rows that may still go out
    batch_files       batch files and their reports in processed/ and   files of a batch not
                      failed/ (and intents/processed, intents/failed),  finished, claimed or being
                      local or object storage, by the file's time       moved; files outside those
                                                                        folders
    audit             rows of the audit trail itself (default 6 years)  -

Every table is written by its own writer module (etl.webhooks.store, etl.intake.records,
etl.orders.outbox, etl.audit); the result documents are blanked here (tests/test_layout.py names
the exception and why). Each class purged adds one audit row (action `purge`, its count).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from etl import audit
from etl.settings import RetentionSettings, Settings
from etl.states import AuditAction, BatchStatus
from etl.warehouse.tables import (
    batch_files,
    lgc_result_values,
    lgc_results,
    rupa_ordered_tests,
    rupa_results,
)

log = logging.getLogger(__name__)

CLASSES = RetentionSettings.CLASSES
PURGED = b""  # a purged document's bytes (the columns are NOT NULL); its row, size and sha256 stay
FILE_FOLDERS = ("processed", "failed", "intents/processed", "intents/failed")
FINISHED_BATCH = frozenset({BatchStatus.LOADED.value, BatchStatus.UNUSABLE.value})


@dataclass
class PurgeReport:
    dry_run: bool
    at: datetime
    retention: dict[str, int]  # class -> days
    purged: dict[str, list] = field(default_factory=dict)  # class -> ids (rows) or names (files)

    def counts(self) -> dict[str, int]:
        return {c: len(self.purged.get(c, [])) for c in CLASSES}

    def cutoff(self, data_class: str) -> datetime:
        return self.at - timedelta(days=self.retention[data_class])

    def as_dict(self) -> dict:
        """PHI-free: counts, days and cutoffs per class (fit for XCom and --json)."""
        return {"dry_run": self.dry_run, "total": sum(self.counts().values()),
                "classes": {c: {"count": n, "retention_days": self.retention[c], "cutoff": self.cutoff(c).isoformat()}
                            for c, n in self.counts().items()}}

    def line(self) -> str:
        verb = "would purge" if self.dry_run else "purged"
        return f"{verb}: " + ", ".join(f"{c} {n}" for c, n in self.counts().items())


# ---- result documents (rows of lgc_results and rupa_results, blanked in place) -------------------

def purge_result_documents(conn: Connection, cutoff: datetime, *, dry_run: bool = False) -> list[str]:
    """Blank the bytes of result documents stored before `cutoff` and drop the values read from
    them. A LetsGetChecked result still waiting for its HL7 (hl7_body NULL: the fetch asks again)
    and a Rupa result whose ordered test has a download pending are kept. Returns
    `lgc:<barcode>` / `rupa:<id>` of the documents."""
    r = lgc_results
    lgc_where = sa.and_(r.c.hl7_body.is_not(None), sa.func.coalesce(r.c.hl7_fetched_at, r.c.fetched_at) < cutoff,
                        sa.or_(sa.func.length(r.c.json_body) > 0, sa.func.length(r.c.hl7_body) > 0))
    barcodes = list(conn.execute(sa.select(r.c.barcode).where(lgc_where).order_by(r.c.barcode)).scalars())
    t, x = rupa_ordered_tests, rupa_results
    pending = sa.select(t.c.id).where(t.c.results_pending == 1)
    rupa_where = sa.and_(x.c.stored_at < cutoff, sa.func.length(x.c.content) > 0, x.c.ordered_test_id.not_in(pending))
    rupa_ids = [int(i) for i in conn.execute(sa.select(x.c.id).where(rupa_where).order_by(x.c.id)).scalars()]
    if not dry_run:
        from etl.results.observations import purge_documents

        purge_documents(conn, barcodes, rupa_ids)  # lab_observations read from them (issue 26)
        if barcodes:
            conn.execute(sa.delete(lgc_result_values).where(lgc_result_values.c.barcode.in_(barcodes)))
            conn.execute(sa.update(r).where(r.c.barcode.in_(barcodes)).values(json_body=PURGED, hl7_body=PURGED))
        if rupa_ids:
            conn.execute(sa.update(x).where(x.c.id.in_(rupa_ids)).values(content=PURGED))
    return [f"lgc:{b}" for b in barcodes] + [f"rupa:{i}" for i in rupa_ids]


# ---- files in the inbox --------------------------------------------------------------------------

def _protected_prefixes(engine: Engine, at: datetime) -> set[str]:
    """`folder/stem.` of every file a batch still needs: not finished, claimed, or mid-move. A
    file of the inbox whose name starts with one is left alone (its reports too)."""
    b = batch_files
    q = sa.select(b.c.status, b.c.stored_as, b.c.moving_from, b.c.moving_to, b.c.claimed_until)
    out: set[str] = set()
    with engine.connect() as conn:
        for row in conn.execute(q).mappings():
            claimed = row["claimed_until"] is not None and _aware(row["claimed_until"]) > at
            needed = row["status"] not in FINISHED_BATCH or claimed or row["moving_to"] is not None
            if not needed:
                continue
            for name in (row["stored_as"], row["moving_from"], row["moving_to"]):
                if name:
                    p = PurePosixPath(name)
                    out.add(str(p.parent / p.stem) + ".")
    return out


def _aware(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts


def purge_files(engine: Engine, settings: Settings, cutoff: datetime, at: datetime, *,
                dry_run: bool = False, store=None) -> list[str]:
    """Files in the inbox's processed/ and failed/ folders (and intents/'s) last written before
    `cutoff`, through the inbox's store (a local folder or object storage alike). Returns their
    names relative to the inbox."""
    from etl.intake.storage import open_store

    store = store or open_store(settings.inbox, conn_id=settings.inbox_conn_id)
    protected = _protected_prefixes(engine, at)
    gone: list[str] = []
    limit = cutoff.timestamp()
    for folder in FILE_FOLDERS:
        for entry in sorted(store.files(folder), key=lambda e: e.name):
            name = f"{folder}/{entry.name}"
            if entry.mtime >= limit or any(name.startswith(p) for p in protected):
                continue
            if dry_run or store.delete(name):
                gone.append(name)
    return gone


# ---- the whole purge -----------------------------------------------------------------------------

def _db_classes() -> dict[str, Callable[[Connection, datetime], list]]:
    from etl.intake.records import purge_rejected_values
    from etl.orders.outbox import purge_settled_bodies
    from etl.webhooks.store import purge_bodies

    return {"webhook_bodies": purge_bodies, "result_documents": purge_result_documents,
            "rejected_values": purge_rejected_values, "outbox_bodies": purge_settled_bodies,
            "audit": audit.purge_expired}


def purge(engine: Engine, settings: Settings, *, dry_run: bool = False, now: datetime | None = None,
          classes: tuple[str, ...] = CLASSES, store=None) -> PurgeReport:
    """Apply the retention of each class in `classes` (all by default): each in its own
    transaction, then one audit row per class that lost something. `dry_run`: only say what
    would go. `now`: the moment the retentions count back from."""
    retention = settings.retention.validated()
    at = now or datetime.now(UTC)
    report = PurgeReport(dry_run=dry_run, at=at, retention={c: retention.days(c) for c in CLASSES})
    db = _db_classes()
    for c in classes:
        cutoff = report.cutoff(c)
        if c == "batch_files":
            report.purged[c] = purge_files(engine, settings, cutoff, at, dry_run=dry_run, store=store)
        else:
            with engine.begin() as conn:
                report.purged[c] = db[c](conn, cutoff, dry_run=dry_run)  # type: ignore[call-arg]
        n = len(report.purged[c])
        if n and not dry_run:
            ids = [i for i in report.purged[c] if c != "batch_files"]
            audit.record(engine, AuditAction.PURGE, c, ids, n,
                         detail=f"{c}: {n} older than {retention.days(c)} days (before {cutoff:%Y-%m-%d %H:%M} UTC)")
            log.info("retention: purged %d %s older than %d days", n, c, retention.days(c))
    return report
