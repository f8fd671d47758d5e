"""Order-intents files in the inbox: their own subfolder, `inbox/intents/`.

    process_intents_inbox(engine, settings) -> [dict]     (the rupa_checkout DAG's `intents` task,
                                                           `labsync intents --inbox`)

Why a subfolder rather than recognising the header: a file is then never read against the wrong
contract, and the order-batch pipeline never sees these files (an intents file dropped among
the order batches is refused with a sentence saying where it belongs).

The inbox may be a local folder or an object store (etl.intake.storage), so nothing here renames: who
processes a file is decided in the warehouse, as for order batches (the batch's claim in
batch_files, by the sha256 of its bytes, with a lease kept alive while the file is worked on);
the file is read from a local temporary copy, its reports are written in a temporary folder and
put beside it, and the move to processed/ or failed/ is the order inbox's copy-then-delete
(etl.intake.inbox.move), which a run that died half-way finishes to the same place. Sending a
file again is safe: the intents ledger never sends a row twice on purpose.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path, PurePosixPath

from sqlalchemy import Engine

from etl.checkout.intents import process_intents_file
from etl.claims import cli_owner
from etl.errors import UnusableInputError
from etl.intake import records, summary
from etl.intake.inbox import move, open_inbox
from etl.intake.storage import Store
from etl.rupa.client import open_client
from etl.settings import Settings
from etl.states import BatchStatus

log = logging.getLogger(__name__)

FOLDER = "intents"
LEGACY = "processing"  # claimed by a rename before labsync claimed in the warehouse: picked up too
REPORT_SUFFIXES = (".rejects.csv", ".summary.html", ".checkout.csv")


@dataclass(frozen=True)
class IntentsInbox:
    """Order-intents files are dropped into their own subfolder of the inbox, so the order
    batch pipeline never sees them and no file is ever taken for the wrong contract:

        inbox/intents/              *.csv dropped here
        inbox/intents/processed/    FILE.csv, FILE.rejects.csv, FILE.summary.html, FILE.checkout.csv
        inbox/intents/failed/       unusable files, with FILE.summary.html saying why
    """

    store: Store

    @classmethod
    def of(cls, settings: Settings) -> IntentsInbox:
        return cls(open_inbox(settings).sub(FOLDER).ensure("processed", "failed"))

    @property
    def root(self) -> str:
        return self.store.url


def _is_intents_file(name: str) -> bool:
    return (name.lower().endswith(".csv") and not name.startswith(".")
            and not name.endswith((".rejects.csv", ".checkout.csv")))


def reports_of(name: str) -> list[str]:
    """The reports written beside an intents file (they move with it)."""
    stem = str(PurePosixPath(name).with_suffix(""))
    return [stem + suffix for suffix in REPORT_SUFFIXES]


def waiting(store: Store, settle: float) -> list[str]:
    """Files to process: leftovers of an older labsync's processing/ folder first, then the files
    dropped in the folder at least `settle` seconds ago, oldest first."""
    now = time.time()
    legacy = sorted(f"{LEGACY}/{e.name}" for e in store.files(LEGACY) if _is_intents_file(e.name))
    fresh = sorted((e.mtime, e.name) for e in store.files() if _is_intents_file(e.name) and now - e.mtime >= settle)
    return legacy + [name for _, name in fresh]


def process_intents_inbox(engine: Engine, settings: Settings, *, settle_seconds: float | None = None,
                          owner: str | None = None) -> list[dict]:
    """Every intents file waiting in inbox/intents/, once. `owner` holds the files' and rows'
    claims (an Airflow task instance, or a new CLI run when None)."""
    box = IntentsInbox.of(settings).store
    owner = owner or cli_owner()
    settle = settings.inbox_settle_seconds if settle_seconds is None else settle_seconds
    lease = timedelta(seconds=settings.lease_seconds)
    outcomes = []
    client = None
    try:
        for name in waiting(box, settle):
            try:
                sha = box.sha256(name)
            except FileNotFoundError:
                continue  # moved by another run meanwhile
            batch_id = records.register_batch(engine, PurePosixPath(name).name, sha)
            if records.claim_batch(engine, batch_id, owner=owner, lease=lease) is None:
                log.info("intents: %s is being processed by another run; left alone", name)
                continue
            try:
                if client is None:
                    client = open_client(settings, engine)
                outcome = _process(engine, settings, box, name, batch_id, client, owner)
            finally:
                records.release_batch(engine, batch_id, owner=owner)
            if outcome is not None:
                outcomes.append(outcome)
    finally:
        if client is not None:
            client.close()
    return outcomes


def _process(engine: Engine, settings: Settings, box: Store, name: str, batch_id: int, client, owner: str) -> dict | None:
    base = f"{FOLDER}/"
    with tempfile.TemporaryDirectory(prefix="labsync-intents-") as tmp:
        local = Path(tmp) / PurePosixPath(name).name
        try:
            with box.open(name, "rb") as src, open(local, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
        except FileNotFoundError:
            return None
        try:
            result = process_intents_file(engine, settings, local, client=client, owner=owner)
        except UnusableInputError as exc:
            target = move(engine, settings, box, batch_id, name, "failed", owner=owner, base=base,
                          reports=reports_of(name))
            if target is None:
                return None
            summary_name = reports_of(target)[1]
            box.write_text(summary_name, summary.render(
                file_name=PurePosixPath(target).name, title="Rupa order intents",
                outcome="This file could not be used; nothing was sent.", counts={},
                note=str(exc).replace(f"{local.name}: ", "", 1)))
            return {"name": PurePosixPath(target).name, "batch_id": None, "status": BatchStatus.UNUSABLE,
                    "error": str(exc), "summary_path": box.url_of(summary_name)}
        # the reports, written beside the temporary copy, go beside the file in the inbox
        folder = str(PurePosixPath(name).parent)
        for report in sorted(Path(tmp).iterdir()):
            if report != local and report.name.startswith(f"{local.stem}.") and not report.name.endswith(".tmp"):
                box.put(report, report.name if folder == "." else f"{folder}/{report.name}")
    target = move(engine, settings, box, batch_id, name, "processed", owner=owner, base=base,
                  reports=reports_of(name))
    if target is None:
        return None
    rejects, summary_name, checkout = reports_of(target)
    return {**result.as_dict(), "name": PurePosixPath(target).name,
            "summary_path": box.url_of(summary_name), "checkout_path": box.url_of(checkout),
            "rejects_path": box.url_of(rejects) if result.rejects_path else None}


__all__ = ["IntentsInbox", "process_intents_inbox", "reports_of"]
