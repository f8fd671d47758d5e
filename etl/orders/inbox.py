"""The CSV inbox: program managers drop order batches, labsync processes each file once.

    inbox/                    *.csv dropped here; a file stays here while it is processed
    inbox/processed/          FILE.csv + FILE.rejects.csv + FILE.fix.csv + FILE.summary.html when done
    inbox/failed/             unusable files, with FILE.summary.html saying why

Three steps, each one function, so the Airflow DAG can map the middle one over chunks:

    prepared = prepare(engine, settings, owner=...)    # claim files, validate, write the outbox
    results  = [load_chunk(engine, settings, c, owner=...) for c in prepared["chunks"]]
    outcomes = finish(engine, settings, prepared, owner=...)   # statuses, summaries, file moves

Everything handed between steps is JSON-safe and PHI-free (ids, names, counts): fit for XCom.
The rows themselves travel through the warehouse (the outbox), never through a local disk, so
each step can run on a different worker.

Who processes a file is decided in the warehouse, not by renaming it: the batch (known by the
sha256 of the file's bytes) is claimed by one owner with a lease (etl.intake.records). Two
`labsync inbox` runs, or the CLI beside the DAG, each process the files they claimed; a file held
by a live run is left alone, and one whose run died (its lease lapsed) is taken over where it
stood: re-validated if its outbox was half-written, loaded and finished if it was staged.
A file that proves unusable goes to failed/ at once, and the other files carry on.

Exactly once: a re-dropped or renamed copy of a batch whose rows are all settled (`loaded`) is
recognised and not processed again (its summary says so); a copy of an `incomplete` batch sends
the rows that did not go through (given-up rows included: a person dropped it again). Rows that
did not go through also go out by themselves: each run resumes `incomplete` batches from the
outbox (`retry`), and a batch whose last row settles becomes `loaded`, its summary rewritten.

The inbox is a local folder or any fsspec URL (`s3://bucket/prefix`, …: etl.intake.storage). Object
stores cannot rename atomically, and nothing here needs them to: the warehouse decides who owns a
file, a move is a copy then a delete recorded in the warehouse first (`move`), and a file is
validated from a local temporary copy inside the one task that reads it; its reports are put
beside it in the inbox before that task ends. Nothing passes between tasks on a local disk.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sqlalchemy import Engine

from etl import audit
from etl.claims import Heartbeat, cli_owner
from etl.claims import now as _now
from etl.errors import BatchesNeedAttention, LabsyncError
from etl.intake import records, summary
from etl.intake.inbox import (
    FAILED,
    PROCESSED,
    companions,
    discover,
    fingerprint,
    move,
    open_inbox,
    write_summary,
)
from etl.intake.names import fix_path_for, rejects_path_for, summary_path
from etl.intake.storage import Store
from etl.logs import counts_text
from etl.orders import outbox, staging
from etl.settings import Settings
from etl.states import BatchStatus, OutboxState

log = logging.getLogger(__name__)

NEEDS_ATTENTION = (BatchStatus.INCOMPLETE, BatchStatus.UNUSABLE)


# ---- the inbox's files: etl.intake.inbox (open_inbox, discover, move, write_summary, …) ----------


def finish_interrupted_moves(engine: Engine, settings: Settings, store: Store, *, owner: str) -> int:
    """Batches whose run died after deleting the inbox copy but before recording where the file
    went: record it now (the file is in processed/ or failed/). Moves whose source is still in
    the inbox are finished by the run that picks the file up again."""
    done = 0
    for row in records.interrupted_moves(engine):
        if records.claim_batch(engine, row["id"], owner=owner, lease=staging.lease(settings)) is None:
            continue
        if store.exists(row["moving_from"]) or not store.exists(row["moving_to"]):
            records.release_batch(engine, row["id"], owner=owner, keep_move=True)
            continue
        target = row["moving_to"]
        if not row["stored_as"] and not target.startswith("intents/"):  # an order batch's file
            # unusable, or its staging could not be recorded (`received` with an error: staging.stage)
            if row["status"] == BatchStatus.UNUSABLE or (row["status"] == BatchStatus.RECEIVED and row["error"]):
                _failed_page(store, target, row["error"] or "the file cannot be used", row["file_name"])
            else:
                render(engine, row["id"], target, store=store)  # the run died before writing it
        values = {} if row["stored_as"] else {"stored_as": target}
        records.release_batch(engine, row["id"], owner=owner, **values)
        log.info("inbox: batch %d: recorded its file at %s (its run stopped after moving it)", row["id"], target)
        done += 1
    return done


# ---- step 1 ------------------------------------------------------------------------------------

def prepare(engine: Engine, settings: Settings, *, owner: str, settle_seconds: float | None = None) -> dict:
    """Claim the files waiting in the inbox (and those of runs that died), validate each whole
    file into the outbox, and list the chunks to load: theirs, and those of `incomplete` batches
    whose rows go out again (`retry`).

    Returns {"batches": [...], "retried": [...], "chunks": [...]}: one entry per file (batch_id,
    file, name, status, counts), per resumed batch, and per chunk (batch_id, first_id, last_id,
    rows, file). An unusable file is already in failed/ with its summary."""
    settings.checked()
    store = open_inbox(settings)
    settle = settings.inbox_settle_seconds if settle_seconds is None else settle_seconds
    batches: list[dict] = []
    with Heartbeat(engine, [owner], lease=staging.lease(settings), interval=settings.heartbeat_seconds):
        finish_interrupted_moves(engine, settings, store, owner=owner)
        for name in discover(store, settle_seconds=settle):
            try:
                batch = _prepare_file(engine, settings, store, name, owner, {b["batch_id"] for b in batches})
            except records.LostClaim:
                log.warning("inbox: %s was taken over by another run; left to it", name)
                continue
            if batch is not None:
                batches.append(batch)
        mine = {b["batch_id"] for b in batches}
        retried = [r for r in retry_batches(engine, settings, owner=owner) if r["batch_id"] not in mine]
    staged = [b for b in batches if b["status"] == BatchStatus.VALIDATED]
    names = {b["batch_id"]: b["name"] for b in [*staged, *retried]}
    chunks = outbox.chunks(engine, list(names), settings.chunk_rows, max_attempts=settings.max_attempts,
                           names=names)
    if batches or chunks:
        log.info("inbox: %d file(s), %d batch(es) resumed, %d chunk(s) to load",
                 len(batches), len(retried), len(chunks))
    return {"batches": batches, "retried": retried, "chunks": [c.as_dict() for c in chunks]}


def _prepare_file(engine: Engine, settings: Settings, store: Store, name: str, owner: str,
                  this_run: set[int]) -> dict | None:
    try:
        sha = fingerprint(store, name)
    except FileNotFoundError:
        return None  # moved by the run that processed it
    taken = staging.take(engine, settings, name, sha, owner=owner)
    if taken is None:
        log.info("inbox: %s is being processed by another run; left alone", name)
        return None
    batch_id, row = taken.batch_id, taken.row
    if batch_id in this_run:  # two copies dropped together: the next run finds this one a duplicate
        log.info("inbox: %s has the same content as another file of this run; it waits for the next run", name)
        return None
    entry = {"batch_id": batch_id, "file": name, "name": name}
    if taken.status == BatchStatus.UNUSABLE:
        return _to_failed(engine, settings, store, name, batch_id, row["error"] or "the file cannot be used", owner)
    if row["stored_as"] and taken.status in (BatchStatus.LOADED, BatchStatus.INCOMPLETE):
        # a copy of a batch that was processed before
        reset = outbox.reset_given_up(engine, [batch_id])
        counts = outbox.counts(engine, [batch_id])[batch_id]
        if staging.final_status(counts) == BatchStatus.LOADED and not staging.needs_validation(engine, taken):
            return _duplicate(engine, settings, store, name, batch_id, row, owner)
        log.info("inbox: %s is batch %d again, with rows still to send%s", name, batch_id,
                 f" ({reset} given up before)" if reset else "")
        # loadable again; this copy is stored (and the summary rewritten) when it is finished
        records.reopen(engine, batch_id, fence=records.fence(batch_id, owner=owner, lease=staging.lease(settings)))
    if staging.needs_validation(engine, taken):
        staged = _stage(engine, settings, store, taken, name, owner)
        if staged.status == BatchStatus.UNUSABLE:
            return _to_failed(engine, settings, store, name, batch_id, staged.error or "", owner)
        log.info("inbox: batch %d (%s): %d rows, %d valid, %d rejected", batch_id, name,
                 staged.total_rows, staged.valid_rows, staged.rejected_rows)
        return {**entry, **staged.as_dict()}
    # staged by a run that died (or finished but never moved the file): carry on from there
    fresh = records.get(engine, batch_id)
    log.info("inbox: %s is batch %d, %s; resuming it", name, batch_id, fresh["status"])
    return {**entry, "status": BatchStatus.VALIDATED, "total_rows": fresh["total_rows"],
            "valid_rows": fresh["valid_rows"], "rejected_rows": fresh["rejected_rows"], "resumed": True}


def _stage(engine: Engine, settings: Settings, store: Store, taken: staging.Taken, name: str,
           owner: str) -> staging.Staged:
    """Validate the file from a local copy (or the file itself, on a local inbox), the reports
    written in a temporary folder of this task, then put beside the file in the inbox: nothing
    of it stays on this worker's disk for a later task."""
    with store.local_copy(name) as local, tempfile.TemporaryDirectory(prefix="labsync-reports-") as tmp:
        reports = Path(tmp)
        staged = staging.stage(engine, settings, taken, local, owner=owner,
                               rejects_path=reports / rejects_path_for(Path(name)).name,
                               fix_path=reports / fix_path_for(Path(name)).name)
        # reports are written in `reports`, or beside the temporary copy of a remote file
        folders = [reports] if store.is_local else [reports, local.parent]
        stem = PurePosixPath(name).stem
        written = {p.name: p for folder in folders for p in folder.iterdir()
                   if p.is_file() and p != local and p.name.startswith(f"{stem}.") and not p.name.endswith(".tmp")}
        if staged.status == BatchStatus.UNUSABLE:
            written = {}  # a report of a file that was never usable misleads
        for report, path in sorted(written.items()):
            store.put(path, report)
        audit.record_files(engine, sorted(written), subject_ids=[taken.batch_id], count=staged.rejected_rows)
        for companion in companions(name):  # a report of an earlier validation of this file
            if PurePosixPath(companion).name not in written and not companion.endswith(".summary.html"):
                store.delete(companion)
    return staged


def _to_failed(engine: Engine, settings: Settings, store: Store, name: str, batch_id: int, reason: str,
               owner: str) -> dict:
    target = move(engine, settings, store, batch_id, name, FAILED, owner=owner)
    if target is not None:
        _failed_page(store, target, reason, name)
        log.warning("inbox: %s is unusable; moved to %s/", name, FAILED)
    if target is not None:
        records.release_batch(engine, batch_id, owner=owner, stored_as=target)
    else:
        records.release_batch(engine, batch_id, owner=owner)
    return {"batch_id": batch_id, "file": target, "name": PurePosixPath(target or name).name,
            "status": BatchStatus.UNUSABLE, "error": reason}


def _failed_page(store: Store, target: str, reason: str, name: str) -> None:
    write_summary(store, target, summary.render(
        file_name=PurePosixPath(target).name, outcome="This file could not be used — nothing was sent.",
        counts={}, note=reason.replace(f"{PurePosixPath(name).name}: ", "", 1), tone="bad",
        links=[summary.Link("The file", PurePosixPath(target).name, target)],
        steps=["Correct the file as the note above says (examples/orders.csv shows a file that "
               "works), then drop it into the inbox again: none of its rows was sent."]))


def _duplicate(engine: Engine, settings: Settings, store: Store, name: str, batch_id: int, row: dict,
               owner: str) -> dict:
    target = move(engine, settings, store, batch_id, name, PROCESSED, owner=owner)
    if target is not None:
        when = row.get("processed_at")
        write_summary(store, target, summary.render(
            file_name=PurePosixPath(target).name, outcome="Already processed — nothing was sent again.", counts={},
            tone="ok", steps=["Nothing to do: see the summary of the first copy."],
            note=f"This file has the same content as {row['file_name']}"
            + (f", processed {when:%Y-%m-%d %H:%M} UTC" if when else "")
            + ". Every row of it already has its outcome; see that file's summary.",
        ))
        log.info("inbox: %s is batch %d again, already processed; nothing to send", name, batch_id)
    records.release_batch(engine, batch_id, owner=owner)
    return {"batch_id": batch_id, "file": target, "name": PurePosixPath(target or name).name, "status": "duplicate"}


def retry_batches(engine: Engine, settings: Settings, *, owner: str, given_up: bool = False) -> list[dict]:
    """Batches whose unsettled rows go out again now (`incomplete` ones, and staged ones whose
    run died), after giving up rows that used their LABSYNC_MAX_ATTEMPTS; `given_up=True` first
    hands given-up rows a fresh budget (a person asked for it)."""
    now = _now()
    if given_up:
        outbox.reset_given_up(engine)
    ids = outbox.retry_batches(engine, owner=owner, lease_until=now + staging.lease(settings), now=now,
                               max_attempts=settings.max_attempts)
    out = []
    for batch_id in ids:
        row = records.get(engine, batch_id)
        out.append({"batch_id": batch_id, "name": row["file_name"], "status": row["status"],
                    "file": row["stored_as"], "claimed": row["claimed_by"] == owner})
    return out


# ---- step 2 ------------------------------------------------------------------------------------

def load_chunk(engine: Engine, settings: Settings, chunk: dict, *, owner: str,
               file_owner: str | None = None, **kw) -> dict:
    """Load one chunk of outbox rows; returns the LoadSummary as a dict plus the batch id.
    `file_owner`: the run holding the batch's file, whose claim the heartbeat keeps alive too."""
    from etl.orders.load import load_chunk as load

    result = load(engine, settings, chunk, owner=owner, heartbeat_owners=[file_owner] if file_owner else [], **kw)
    log.info("batch %s rows %s-%s: %s", chunk["batch_id"], chunk["first_id"], chunk["last_id"],
             counts_text(result.counts))
    return {"batch_id": chunk["batch_id"], **result.as_dict()}


# ---- step 3 ------------------------------------------------------------------------------------

def finish(engine: Engine, settings: Settings, prepared: dict, *, owner: str) -> list[dict]:
    """Record each batch `loaded` or `incomplete` from its outbox, write its summary page, move
    its file to processed/. Only the run holding a batch's claim finishes it (a batch another
    run took over is reported as such); a resumed batch whose last row settled becomes `loaded`
    and its summary is written again. Safe to run twice."""
    store = open_inbox(settings)
    outcomes = []
    for batch in prepared["batches"]:
        if batch["status"] != BatchStatus.VALIDATED:
            outcomes.append(batch)
            continue
        outcomes.append(_finish_file(engine, settings, store, batch, owner))
    for batch in prepared.get("retried", []):
        batch_id = batch["batch_id"]
        if batch.get("claimed"):  # a staged batch of a run that died: finish it for that run
            status = staging.finish(engine, settings, batch_id, owner=owner)
            records.release_batch(engine, batch_id, owner=owner, keep_move=True)
            if status is not None:
                log.info("batch %d (%s): %s", batch_id, batch["name"], status)
        if not settle(engine, settings, [batch_id], store=store):
            _rerender(engine, settings, batch_id, store=store)  # still incomplete: its rows' news (e.g. given up)
        outcomes.append(_outcome(engine, batch_id, {"name": batch["name"], "retried": True}))
    return outcomes


def _finish_file(engine: Engine, settings: Settings, store: Store, batch: dict, owner: str) -> dict:
    batch_id = batch["batch_id"]
    status = staging.finish(engine, settings, batch_id, owner=owner)
    if status is None:
        log.warning("inbox: batch %d (%s) was taken over by another run, which finishes it",
                    batch_id, batch["name"])
        return _outcome(engine, batch_id, {**batch, "taken_over": True})
    target = move(engine, settings, store, batch_id, batch["file"], PROCESSED, owner=owner)
    if target is None:  # gone: someone removed it; the warehouse still has every outcome
        log.warning("inbox: %s is no longer in the inbox; its outcomes are in the warehouse", batch["name"])
        records.release_batch(engine, batch_id, owner=owner)
        return _outcome(engine, batch_id, batch)
    render(engine, batch_id, target, store=store)
    records.release_batch(engine, batch_id, owner=owner, stored_as=target)
    settle(engine, settings, [batch_id], store=store)  # rows another run settled meanwhile
    out = _outcome(engine, batch_id, {**batch, "file": target, "name": PurePosixPath(target).name})
    log.info("inbox: batch %d %s, %s", batch_id, out["status"], counts_text(out["counts"]))
    return out


def _outcome(engine: Engine, batch_id: int, base: dict) -> dict:
    row = records.get(engine, batch_id)
    counts = {k: v for k, v in sorted(outbox.counts(engine, [batch_id])[batch_id].items()) if v}
    counts["rejected before sending"] = row["rejected_rows"] or 0
    return {**base, "batch_id": batch_id, "status": row["status"], "counts": counts,
            "summary": summary_path(PurePosixPath(row["stored_as"])).as_posix() if row["stored_as"] else None}


def settle(engine: Engine, settings: Settings, batch_ids: list[int], *, store: Store | None = None) -> list[int]:
    """Batches that became `loaded` now that their last row settled; their summary pages (where
    their file is in the inbox) are written again. Returns those batch ids."""
    flipped = []
    for batch_id in batch_ids:
        if staging.settle(engine, batch_id):
            flipped.append(batch_id)
            _rerender(engine, settings, batch_id, store=store)
            log.info("batch %d: every row settled; loaded", batch_id)
    return flipped


def _rerender(engine: Engine, settings: Settings, batch_id: int, *, store: Store | None = None) -> None:
    """Write a finished batch's summary again, beside its file in processed/ (if it is there)."""
    stored = records.get(engine, batch_id)["stored_as"]
    if not stored:
        return
    store = store or open_inbox(settings)
    if store.exists(stored):
        render(engine, batch_id, stored, store=store)


def render(engine: Engine, batch_id: int, batch_file: str, *, store: Store, where: str | None = None) -> str:
    """The batch's summary page, from the warehouse alone (outbox, ledger, rejected rows, and the
    accepted orders' item statuses once `labsync track` or a webhook has told them). `where`: the
    file's place in the inbox, as the page shows it (`processed/orders.csv`)."""
    from etl.orders.lifecycle import item_statuses

    row = records.get(engine, batch_id)
    counts = outbox.counts(engine, [batch_id])[batch_id]
    rows = outbox.rows_of(engine, batch_id)
    rejected_rows = row["rejected_rows"] or 0
    shown = [r["client_order_id"] for r in rows if r["state"] == OutboxState.ACCEPTED][:summary.MAX_SHOWN_ROWS]
    path = PurePosixPath(batch_file)
    reports = ({"rejects": rejects_path_for(path).name, "fix": fix_path_for(path).name}
               if rejected_rows else {})
    written = write_summary(store, batch_file, summary.batch_page(
        file_name=path.name, total_rows=row["total_rows"] or 0, rejected_rows=rejected_rows,
        counts=counts, rejected=records.rejected_first(engine, batch_id, summary.MAX_SHOWN_ROWS),
        outbox_rows=rows, item_statuses=item_statuses(engine, shown),
        where=where or batch_file, reports=reports, batch_id=batch_id))
    audit.record_files(engine, [summary_path(path).as_posix()], subject_ids=[batch_id], count=row["total_rows"] or 0)
    return written


# ---- the whole run -----------------------------------------------------------------------------

def needs_attention(outcomes: list[dict]) -> list[dict]:
    """Batches of a run that a person or a later run must see to: incomplete or unusable."""
    return [o for o in outcomes if o.get("status") in NEEDS_ATTENTION]


def check(outcomes: list[dict]) -> None:
    """The run's verdict for the DAG: raise when a batch ended incomplete or a file was unusable,
    so the run is `failed` (red) and on_failure_callback alerts; summaries and moves are done."""
    bad = needs_attention(outcomes)
    if bad:
        parts = []
        for o in bad:
            counts = o.get("counts", {})
            left = {k: v for k, v in counts.items() if k in (*outbox.RETRYABLE, OutboxState.GIVEN_UP) and v}
            parts.append(f"{o['name']} {o['status']}" + (f" ({', '.join(f'{k} {v}' for k, v in left.items())})" if left else ""))
        raise BatchesNeedAttention(
            f"{len(bad)} batch(es) need attention: {'; '.join(parts)}. Unsettled rows go out again on the "
            "next runs; given-up rows and unusable files need a person (see their summaries)"
        )


@dataclass
class InboxRun:
    outcomes: list[dict]
    error: LabsyncError | None = None  # why loading stopped early (the vendor down, keys refused)


def run_once(engine: Engine, settings: Settings, *, owner: str | None = None, **kw) -> InboxRun:
    """The whole inbox in one process (the `labsync inbox` command; the DAG does the same in
    tasks). A load that fails (the vendor unreachable) stops the loading, never the finishing:
    every file still gets its summary and its true status, and its rows go out on a later run."""
    owner = owner or cli_owner()
    prepared = prepare(engine, settings, owner=owner)
    error = None
    for chunk in prepared["chunks"]:
        try:
            load_chunk(engine, settings, chunk, owner=owner, file_owner=owner, **kw)
        except LabsyncError as exc:
            if exc.exit_code == 130:
                raise
            error = exc
            log.error("inbox: loading stopped: %s", exc)
            break
    return InboxRun(finish(engine, settings, prepared, owner=owner), error)
