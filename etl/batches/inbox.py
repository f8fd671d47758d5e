"""The CSV inbox: program managers drop order batches, labsync processes each file once.

    inbox/                    *.csv dropped here
    inbox/processing/         a file being processed (claimed by an atomic rename)
    inbox/processing/.work/   valid rows staged as JSONL chunks, one per load task
    inbox/processed/          FILE.csv + FILE.rejects.csv + FILE.summary.html when done
    inbox/failed/             unusable files, with FILE.summary.html saying why

Three steps, each one function, so the Airflow DAG can map the middle one over chunks:

    prepared = prepare(engine, settings)              # claim, validate, stage chunks
    results  = [load_chunk(engine, settings, c) for c in prepared["chunks"]]
    outcomes = finish(engine, settings, prepared, results)   # summaries, file moves

Everything handed between steps is JSON-safe and PHI-free (ids, paths, counts): fit for XCom.

Exactly once: a file is known by the sha256 of its bytes. A re-dropped or renamed copy of a
batch whose rows are all settled (`loaded`) is recognised and not processed again (its summary
says so); a copy of an `incomplete` batch (failed or pending rows, or rows of a load task that
died) is processed again, which sends only those rows (the ledger skips the rest). A run that dies half-way leaves its files in
processing/; the next run picks them up, and the ledger makes the re-send safe.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from etl.batches import records, summary
from etl.batches.validate import rejects_path_for
from etl.errors import UnusableInputError
from etl.settings import Settings

log = logging.getLogger(__name__)

UNSETTLED = ("pending", "failed")


@dataclass(frozen=True)
class InboxPaths:
    root: Path

    @property
    def processing(self) -> Path:
        return self.root / "processing"

    @property
    def processed(self) -> Path:
        return self.root / "processed"

    @property
    def failed(self) -> Path:
        return self.root / "failed"

    @property
    def work(self) -> Path:
        return self.processing / ".work"

    def ensure(self) -> InboxPaths:
        for d in (self.root, self.processing, self.processed, self.failed, self.work):
            d.mkdir(parents=True, exist_ok=True)
        return self


def _is_batch_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() == ".csv" and not p.name.startswith(".") and not p.name.endswith(".rejects.csv")


def discover(paths: InboxPaths, *, settle_seconds: float = 0.0) -> list[Path]:
    """CSV files waiting in the inbox, oldest first. A file modified within the last
    `settle_seconds` may still be being copied in and is left for the next run."""
    now = time.time()
    found = [p for p in paths.root.iterdir() if _is_batch_file(p) and now - p.stat().st_mtime >= settle_seconds]
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


def _free_name(folder: Path, name: str) -> Path:
    """folder/name, or folder/stem.2.csv, … if taken (never overwrite an earlier file)."""
    target = folder / name
    n = 2
    while target.exists():
        target = folder / f"{Path(name).stem}.{n}{Path(name).suffix}"
        n += 1
    return target


def _claim(paths: InboxPaths, path: Path) -> Path | None:
    target = _free_name(paths.processing, path.name)
    try:
        path.rename(target)  # atomic on one filesystem: two runs cannot both claim it
    except FileNotFoundError:
        return None  # claimed by someone else meanwhile
    return target


def _move_with_reports(path: Path, folder: Path) -> Path:
    """Move a batch file and its rejects/summary files together into `folder`."""
    target = _free_name(folder, path.name)
    for companion in (rejects_path_for(path), _summary_path(path)):
        if companion.exists():
            companion.replace(folder / companion.name.replace(path.stem, target.stem, 1))
    path.replace(target)
    return target


def _summary_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.summary.html")


# ---- step 1 ------------------------------------------------------------------------------------

def prepare(engine: Engine, settings: Settings, *, settle_seconds: float | None = None) -> dict:
    """Claim new files (and leftovers of an interrupted run), validate them, stage valid rows.

    Returns {"batches": [...], "chunks": [...]}: one entry per file (batch_id, file, status,
    counts) and one per staged chunk (batch_id, path, rows)."""
    paths = InboxPaths(Path(settings.inbox)).ensure()
    settle = settings.inbox_settle_seconds if settle_seconds is None else settle_seconds
    leftovers = sorted(p for p in paths.processing.iterdir() if _is_batch_file(p))
    claimed = [c for c in (_claim(paths, p) for p in discover(paths, settle_seconds=settle)) if c]
    batches, chunks = [], []
    for path in [*leftovers, *claimed]:
        batch, staged = _prepare_one(engine, settings, paths, path)
        batches.append(batch)
        chunks.extend(staged)
    if batches:
        log.info("inbox: %d file(s), %d chunk(s) to load", len(batches), len(chunks))
    return {"batches": batches, "chunks": chunks}


def _prepare_one(engine: Engine, settings: Settings, paths: InboxPaths, path: Path) -> tuple[dict, list[dict]]:
    try:
        batch_id, validation = records.open_batch(engine, path)
    except UnusableInputError as exc:
        return _unusable(paths, path, str(exc)), []
    earlier = records.find_batch(engine, validation.sha256)
    if earlier and earlier["status"] == "loaded" and not _unsettled(engine, batch_id):
        target = _move_with_reports(path, paths.processed)
        _write_summary_for_duplicate(target, earlier)
        log.info("inbox: %s is batch %d again, already processed; nothing to send", target.name, batch_id)
        return {"batch_id": batch_id, "file": str(target), "name": target.name, "status": "duplicate"}, []
    work = paths.work / str(batch_id)
    shutil.rmtree(work, ignore_errors=True)  # a re-run restages from scratch
    work.mkdir(parents=True)
    staged = []
    for rows in _rechunk(validation.chunks(), settings.chunk_rows):
        chunk_path = work / f"chunk-{len(staged) + 1:05d}.jsonl"
        with chunk_path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        staged.append({"batch_id": batch_id, "path": str(chunk_path), "rows": len(rows)})
    result = records.close_batch(engine, batch_id, validation)
    log.info("inbox: batch %d (%s): %d rows, %d valid, %d rejected", batch_id, path.name,
             result.total_rows, result.valid_rows, result.rejected_rows)
    batch = {
        "batch_id": batch_id, "file": str(path), "name": path.name, "status": "validated",
        "total_rows": result.total_rows, "valid_rows": result.valid_rows,
        "rejected_rows": result.rejected_rows, "problems": result.problems,
    }
    return batch, staged


def _rechunk(chunks: Iterator[list[dict]], size: int) -> Iterator[list[dict]]:
    buf: list[dict] = []
    for rows in chunks:
        buf.extend(rows)
        while len(buf) >= size:
            yield buf[:size]
            buf = buf[size:]
    if buf:
        yield buf


def _unsettled(engine: Engine, batch_id: int) -> bool:
    from etl.lgc import ledger

    counts = ledger.state_counts(engine, batch_ids=[batch_id])
    return any(counts.get(s) for s in UNSETTLED)


def _unusable(paths: InboxPaths, path: Path, reason: str) -> dict:
    target = _move_with_reports(path, paths.failed)
    summary.write(_summary_path(target), summary.render(
        file_name=target.name, outcome="This file could not be used; nothing was sent.",
        counts={}, note=reason.replace(f"{path.name}: ", "", 1)))
    log.warning("inbox: %s is unusable; moved to %s", path.name, paths.failed)
    return {"batch_id": None, "file": str(target), "name": target.name, "status": "unusable", "error": reason}


def _write_summary_for_duplicate(target: Path, earlier: dict) -> None:
    when = earlier.get("processed_at")
    summary.write(_summary_path(target), summary.render(
        file_name=target.name,
        outcome="Already processed: nothing was sent again.",
        counts={},
        note=f"This file has the same content as {earlier['file_name']}"
        + (f", processed {when:%Y-%m-%d %H:%M} UTC" if when else "")
        + ". Every row of it already has its outcome; see that file's summary.",
    ))


# ---- step 2 ------------------------------------------------------------------------------------

def read_chunk(path: str | Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def load_chunk(engine: Engine, settings: Settings, chunk: dict, **kw) -> dict:
    """Load one staged chunk; returns the LoadSummary as a dict plus the batch id."""
    from etl.lgc.load import load_rows

    result = load_rows(engine, settings, read_chunk(chunk["path"]), batch_id=chunk["batch_id"], **kw)
    log.info("batch %s chunk %s: %s", chunk["batch_id"], Path(chunk["path"]).name, dict(result.counts))
    return {"batch_id": chunk["batch_id"], **result.as_dict()}


# ---- step 3 ------------------------------------------------------------------------------------

def finish(engine: Engine, settings: Settings, prepared: dict, results: list[dict | None]) -> list[dict]:
    """Write each batch's summary page, move its file out of processing/, record it `loaded`.

    `results` are load_chunk's return values (None for a chunk whose task failed: its rows stay
    pending/failed in the ledger and the summary says so)."""
    from etl.lgc import ledger
    from etl.lgc.lifecycle import item_statuses

    paths = InboxPaths(Path(settings.inbox)).ensure()
    by_batch: dict[int, Counter] = {}
    for r in results:
        if r:
            by_batch.setdefault(r["batch_id"], Counter()).update(r.get("counts", {}))
    outcomes = []
    for batch in prepared["batches"]:
        if batch["status"] != "validated":
            outcomes.append(batch)
            continue
        batch_id, path = batch["batch_id"], Path(batch["file"])
        ledger_rows = ledger.status_rows(engine, batch_ids=[batch_id])
        counts = Counter(by_batch.get(batch_id, Counter()))
        # rows of chunks whose task died are still pending/failed in the ledger
        settled = sum(counts.values())
        if settled < batch["valid_rows"]:
            missing = Counter(r["state"] for r in ledger_rows if r["state"] in UNSETTLED)
            counts.update({k: v for k, v in missing.items()})
            if sum(counts.values()) < batch["valid_rows"]:
                counts["pending"] += batch["valid_rows"] - sum(counts.values())
        counts["rejected before sending"] = batch["rejected_rows"]
        rejects = rejects_path_for(path)
        rejected = _read_rejects(rejects)
        accepted = [r for r in ledger_rows if r["state"] == "accepted"]
        problems = [r for r in ledger_rows if r["state"] in ("rejected", "failed", "pending")]
        ok = not any(counts.get(s) for s in ("failed", "pending", "rejected", "busy"))
        outcome = (
            "All valid rows went through." if ok else "Some rows did not go through; see below."
        ) + f" {batch['valid_rows']} of {batch['total_rows']} rows were valid."
        summary.write(_summary_path(path), summary.render(
            file_name=path.name, outcome=outcome, counts=dict(counts), rejected=rejected,
            accepted=accepted, problem_rows=problems,
            item_statuses=item_statuses(engine, [r["client_order_id"] for r in accepted])))
        target = _move_with_reports(path, paths.processed)
        # `incomplete`: some rows were never settled (a load task died, the vendor was down);
        # dropping the file again sends them, where a `loaded` copy counts as a duplicate.
        status = "incomplete" if any(counts.get(s) for s in ("failed", "pending", "busy")) else "loaded"
        records.set_status(engine, batch_id, status)
        shutil.rmtree(paths.work / str(batch_id), ignore_errors=True)
        log.info("inbox: batch %d %s, %s", batch_id, status, dict(counts))
        outcomes.append({**batch, "file": str(target), "name": target.name, "status": status,
                         "counts": dict(counts), "summary": str(_summary_path(target))})
    return outcomes


def _read_rejects(path: Path) -> list[dict]:
    import csv

    if not path.exists():
        return []
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def run_once(engine: Engine, settings: Settings, **kw) -> list[dict]:
    """The whole inbox in one process (the `labsync inbox` command; the DAG does the same in tasks)."""
    prepared = prepare(engine, settings)
    results = [load_chunk(engine, settings, c, **kw) for c in prepared["chunks"]]
    return finish(engine, settings, prepared, results)
