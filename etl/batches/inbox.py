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
sha256 of the file's bytes) is claimed by one owner with a lease (etl.batches.records). Two
`labsync inbox` runs, or the CLI beside the DAG, each process the files they claimed; a file held
by a live run is left alone, and one whose run died (its lease lapsed) is taken over where it
stood: re-validated if its outbox was half-written, loaded and finished if it was staged.
A file that proves unusable goes to failed/ at once, and the other files carry on.

Exactly once: a re-dropped or renamed copy of a batch whose rows are all settled (`loaded`) is
recognised and not processed again (its summary says so); a copy of an `incomplete` batch sends
the rows that did not go through (given-up rows included: a person dropped it again). Rows that
did not go through also go out by themselves: each run resumes `incomplete` batches from the
outbox (`retry`), and a batch whose last row settles becomes `loaded`, its summary rewritten.

The file operations are the few functions under "storage" below, so that the inbox can move to
object storage without touching the rest.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from etl.batches import records, staging, summary
from etl.batches.names import fix_path_for, rejects_path_for, summary_path
from etl.claims import Heartbeat, cli_owner
from etl.claims import now as _now
from etl.errors import LabsyncError
from etl.lgc import outbox
from etl.logs import counts_text
from etl.settings import Settings
from etl.states import BatchStatus, OutboxState

log = logging.getLogger(__name__)

NEEDS_ATTENTION = (BatchStatus.INCOMPLETE, BatchStatus.UNUSABLE)


# ---- storage: the only functions that touch the inbox's files ----------------------------------

@dataclass(frozen=True)
class InboxPaths:
    root: Path

    @property
    def processed(self) -> Path:
        return self.root / "processed"

    @property
    def failed(self) -> Path:
        return self.root / "failed"

    def ensure(self) -> InboxPaths:
        for d in (self.root, self.processed, self.failed):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def resolve(self, relative: str) -> Path:
        return self.root / relative


def _is_batch_file(p: Path) -> bool:
    """Any file whose name ends in .csv (any case, trailing spaces ignored), dotted names such as
    `..csv` included: an odd name is processed, not ignored. Our own reject reports are not."""
    name = p.name.rstrip().lower()
    return p.is_file() and name.endswith(".csv") and not name.endswith(".rejects.csv")


def _why_not_a_batch(p: Path) -> str:
    if p.name.rstrip().lower().endswith(".rejects.csv"):
        return "its name ends in .rejects.csv, the name labsync gives its reject reports"
    return "labsync reads files whose name ends in .csv"


def discover(paths: InboxPaths, *, settle_seconds: float = 0.0) -> list[Path]:
    """CSV files waiting in the inbox, oldest first. A file modified within the last
    `settle_seconds` may still be being copied in and is left for the next run. Any other file
    is left where it is and reported in the log (never silently ignored)."""
    now = time.time()
    found = []
    files = list(paths.root.iterdir())
    # FILE.fix.csv written beside a FILE.csv still being processed is that file's report, not a
    # batch; once the pair has moved to processed/, a fix file dropped back is a batch like any
    companions = {fix_path_for(p).name for p in files}
    for p in files:
        with contextlib.suppress(FileNotFoundError):  # moved by another run meanwhile
            if p.name in companions:
                continue
            if _is_batch_file(p):
                if now - p.stat().st_mtime >= settle_seconds:
                    found.append((p.stat().st_mtime, p.name, p))
            elif p.is_file():
                log.warning("inbox: left %s where it is: not a batch file (%s)", p.name, _why_not_a_batch(p))
    return [p for *_, p in sorted(found)]


def fingerprint(path: Path) -> str:
    """sha256 of the file's bytes: the batch's identity (FileNotFoundError if it is gone)."""
    return staging.sha256_of(path)


@contextlib.contextmanager
def local_file(path: Path) -> Iterator[Path]:
    """A local path to read the batch from (the file itself, for a local inbox)."""
    yield path


def _free_name(folder: Path, name: str) -> Path:
    """folder/name, or folder/stem.2.csv, … if taken (never overwrite an earlier file)."""
    target = folder / name
    n = 2
    while target.exists():
        target = folder / f"{Path(name).stem}.{n}{Path(name).suffix}"
        n += 1
    return target


def move(path: Path, folder: Path) -> Path | None:
    """Move a batch file and its reports (rejects, summary) into `folder`; None if the file is
    gone (another run moved it first: that is fine)."""
    target = _free_name(folder, path.name)
    try:
        path.replace(target)
    except FileNotFoundError:
        return None
    for companion in (rejects_path_for(path), fix_path_for(path), summary_path(path)):
        with contextlib.suppress(FileNotFoundError):
            companion.replace(folder / companion.name.replace(path.stem, target.stem, 1))
    return target


def write_summary(batch_file: Path, page: str) -> Path:
    return summary.write(summary_path(batch_file), page)


# ---- step 1 ------------------------------------------------------------------------------------

def prepare(engine: Engine, settings: Settings, *, owner: str, settle_seconds: float | None = None) -> dict:
    """Claim the files waiting in the inbox (and those of runs that died), validate each whole
    file into the outbox, and list the chunks to load: theirs, and those of `incomplete` batches
    whose rows go out again (`retry`).

    Returns {"batches": [...], "retried": [...], "chunks": [...]}: one entry per file (batch_id,
    file, name, status, counts), per resumed batch, and per chunk (batch_id, first_id, last_id,
    rows, file). An unusable file is already in failed/ with its summary."""
    settings.checked()
    paths = InboxPaths(Path(settings.inbox)).ensure()
    settle = settings.inbox_settle_seconds if settle_seconds is None else settle_seconds
    batches: list[dict] = []
    with Heartbeat(engine, [owner], lease=staging.lease(settings), interval=settings.heartbeat_seconds):
        for path in discover(paths, settle_seconds=settle):
            try:
                batch = _prepare_file(engine, settings, paths, path, owner, {b["batch_id"] for b in batches})
            except records.LostClaim:
                log.warning("inbox: %s was taken over by another run; left to it", path.name)
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


def _prepare_file(engine: Engine, settings: Settings, paths: InboxPaths, path: Path, owner: str,
                  this_run: set[int]) -> dict | None:
    try:
        sha = fingerprint(path)
    except FileNotFoundError:
        return None  # moved by the run that processed it
    taken = staging.take(engine, settings, path.name, sha, owner=owner)
    if taken is None:
        log.info("inbox: %s is being processed by another run; left alone", path.name)
        return None
    batch_id, row = taken.batch_id, taken.row
    if batch_id in this_run:  # two copies dropped together: the next run finds this one a duplicate
        log.info("inbox: %s has the same content as another file of this run; it waits for the next run",
                 path.name)
        return None
    entry = {"batch_id": batch_id, "file": paths.relative(path), "name": path.name}
    if taken.status == BatchStatus.UNUSABLE:
        return _to_failed(engine, paths, path, batch_id, row["error"] or "the file cannot be used", owner)
    if row["stored_as"] and taken.status in (BatchStatus.LOADED, BatchStatus.INCOMPLETE):
        # a copy of a batch that was processed before
        reset = outbox.reset_given_up(engine, [batch_id])
        counts = outbox.counts(engine, [batch_id])[batch_id]
        if staging.final_status(counts) == BatchStatus.LOADED and not staging.needs_validation(engine, taken):
            return _duplicate(engine, paths, path, batch_id, row, owner)
        log.info("inbox: %s is batch %d again, with rows still to send%s", path.name, batch_id,
                 f" ({reset} given up before)" if reset else "")
        # loadable again; this copy is stored (and the summary rewritten) when it is finished
        records.reopen(engine, batch_id, fence=records.fence(batch_id, owner=owner, lease=staging.lease(settings)))
    if staging.needs_validation(engine, taken):
        with local_file(path) as local:
            staged = staging.stage(engine, settings, taken, local, owner=owner,
                                   rejects_path=rejects_path_for(path), fix_path=fix_path_for(path))
        if staged.status == BatchStatus.UNUSABLE:
            return _to_failed(engine, paths, path, batch_id, staged.error or "", owner)
        log.info("inbox: batch %d (%s): %d rows, %d valid, %d rejected", batch_id, path.name,
                 staged.total_rows, staged.valid_rows, staged.rejected_rows)
        return {**entry, **staged.as_dict()}
    # staged by a run that died (or finished but never moved the file): carry on from there
    fresh = records.get(engine, batch_id)
    log.info("inbox: %s is batch %d, %s; resuming it", path.name, batch_id, fresh["status"])
    return {**entry, "status": BatchStatus.VALIDATED, "total_rows": fresh["total_rows"],
            "valid_rows": fresh["valid_rows"], "rejected_rows": fresh["rejected_rows"], "resumed": True}


def _to_failed(engine: Engine, paths: InboxPaths, path: Path, batch_id: int, reason: str, owner: str) -> dict:
    target = move(path, paths.failed)
    if target is not None:
        write_summary(target, summary.render(
            file_name=target.name, outcome="This file could not be used — nothing was sent.",
            counts={}, note=reason.replace(f"{path.name}: ", "", 1), tone="bad",
            links=[summary.Link("The file", target.name, paths.relative(target))],
            steps=["Correct the file as the note above says (examples/orders.csv shows a file that "
                   "works), then drop it into the inbox again: none of its rows was sent."]))
        log.warning("inbox: %s is unusable; moved to %s", path.name, paths.failed)
    records.release_batch(engine, batch_id, owner=owner,
                          **({"stored_as": paths.relative(target)} if target is not None else {}))
    name = target.name if target is not None else path.name
    return {"batch_id": batch_id, "file": paths.relative(target) if target else None, "name": name,
            "status": BatchStatus.UNUSABLE, "error": reason}


def _duplicate(engine: Engine, paths: InboxPaths, path: Path, batch_id: int, row: dict, owner: str) -> dict:
    target = move(path, paths.processed)
    if target is not None:
        when = row.get("processed_at")
        write_summary(target, summary.render(
            file_name=target.name, outcome="Already processed — nothing was sent again.", counts={},
            tone="ok", steps=["Nothing to do: see the summary of the first copy."],
            note=f"This file has the same content as {row['file_name']}"
            + (f", processed {when:%Y-%m-%d %H:%M} UTC" if when else "")
            + ". Every row of it already has its outcome; see that file's summary.",
        ))
        log.info("inbox: %s is batch %d again, already processed; nothing to send", path.name, batch_id)
    records.release_batch(engine, batch_id, owner=owner)
    return {"batch_id": batch_id, "file": paths.relative(target) if target else None,
            "name": target.name if target else path.name, "status": "duplicate"}


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
    from etl.lgc.load import load_chunk as load

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
    paths = InboxPaths(Path(settings.inbox)).ensure()
    outcomes = []
    for batch in prepared["batches"]:
        if batch["status"] != BatchStatus.VALIDATED:
            outcomes.append(batch)
            continue
        outcomes.append(_finish_file(engine, settings, paths, batch, owner))
    for batch in prepared.get("retried", []):
        batch_id = batch["batch_id"]
        if batch.get("claimed"):  # a staged batch of a run that died: finish it for that run
            status = staging.finish(engine, settings, batch_id, owner=owner)
            records.release_batch(engine, batch_id, owner=owner)
            if status is not None:
                log.info("batch %d (%s): %s", batch_id, batch["name"], status)
        if not settle(engine, settings, [batch_id]):
            _rerender(engine, settings, batch_id)  # still incomplete: its rows' news (e.g. given up)
        outcomes.append(_outcome(engine, batch_id, {"name": batch["name"], "retried": True}))
    return outcomes


def _finish_file(engine: Engine, settings: Settings, paths: InboxPaths, batch: dict, owner: str) -> dict:
    batch_id = batch["batch_id"]
    status = staging.finish(engine, settings, batch_id, owner=owner)
    if status is None:
        log.warning("inbox: batch %d (%s) was taken over by another run, which finishes it",
                    batch_id, batch["name"])
        return _outcome(engine, batch_id, {**batch, "taken_over": True})
    path = paths.resolve(batch["file"])
    target = move(path, paths.processed)
    if target is None:  # gone: someone removed it; the warehouse still has every outcome
        log.warning("inbox: %s is no longer in the inbox; its outcomes are in the warehouse", batch["name"])
        records.release_batch(engine, batch_id, owner=owner)
        return _outcome(engine, batch_id, batch)
    render(engine, batch_id, target, where=paths.relative(target))
    records.release_batch(engine, batch_id, owner=owner, stored_as=paths.relative(target))
    settle(engine, settings, [batch_id])  # rows another run settled meanwhile
    out = _outcome(engine, batch_id, {**batch, "file": paths.relative(target), "name": target.name})
    log.info("inbox: batch %d %s, %s", batch_id, out["status"], counts_text(out["counts"]))
    return out


def _outcome(engine: Engine, batch_id: int, base: dict) -> dict:
    row = records.get(engine, batch_id)
    counts = {k: v for k, v in sorted(outbox.counts(engine, [batch_id])[batch_id].items()) if v}
    counts["rejected before sending"] = row["rejected_rows"] or 0
    return {**base, "batch_id": batch_id, "status": row["status"], "counts": counts,
            "summary": str(summary_path(Path(row["stored_as"]))) if row["stored_as"] else None}


def settle(engine: Engine, settings: Settings, batch_ids: list[int]) -> list[int]:
    """Batches that became `loaded` now that their last row settled; their summary pages (where
    their file is in the inbox) are written again. Returns those batch ids."""
    flipped = []
    for batch_id in batch_ids:
        if staging.settle(engine, batch_id):
            flipped.append(batch_id)
            _rerender(engine, settings, batch_id)
            log.info("batch %d: every row settled; loaded", batch_id)
    return flipped


def _rerender(engine: Engine, settings: Settings, batch_id: int) -> None:
    """Write a finished batch's summary again, beside its file in processed/ (if it has one)."""
    paths = InboxPaths(Path(settings.inbox))
    stored = records.get(engine, batch_id)["stored_as"]
    if stored and paths.resolve(stored).parent.exists():
        render(engine, batch_id, paths.resolve(stored), where=stored)


def render(engine: Engine, batch_id: int, batch_file: Path, *, where: str | None = None) -> Path:
    """The batch's summary page, from the warehouse alone (outbox, ledger, rejected rows, and the
    accepted orders' item statuses once `labsync track` or a webhook has told them). `where`: the
    file's place in the inbox, as the page shows it (`processed/orders.csv`)."""
    from etl.lgc.lifecycle import item_statuses

    row = records.get(engine, batch_id)
    counts = outbox.counts(engine, [batch_id])[batch_id]
    rows = outbox.rows_of(engine, batch_id)
    rejected_rows = row["rejected_rows"] or 0
    shown = [r["client_order_id"] for r in rows if r["state"] == OutboxState.ACCEPTED][:summary.MAX_SHOWN_ROWS]
    reports = ({"rejects": rejects_path_for(batch_file).name, "fix": fix_path_for(batch_file).name}
               if rejected_rows else {})
    return write_summary(batch_file, summary.batch_page(
        file_name=batch_file.name, total_rows=row["total_rows"] or 0, rejected_rows=rejected_rows,
        counts=counts, rejected=records.rejected_first(engine, batch_id, summary.MAX_SHOWN_ROWS),
        outbox_rows=rows, item_statuses=item_statuses(engine, shown),
        where=where or f"{batch_file.parent.name}/{batch_file.name}", reports=reports, batch_id=batch_id))


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


class BatchesNeedAttention(LabsyncError):
    """A run ended with incomplete batches or unusable files (exit 1; the DAG run fails)."""


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
