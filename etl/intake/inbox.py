"""The inbox's files, for every kind of batch (order batches: etl.orders.inbox; order intents:
etl.checkout.inbox): finding the batch files, their identity, the reports beside them, and moving
a file with its reports into processed/ or failed/, safely on an object store. These are the only
functions that touch the inbox's files; who owns a file is decided in the warehouse
(etl.intake.records)."""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import timedelta
from pathlib import PurePosixPath

from sqlalchemy import Engine

from etl.intake import records, storage
from etl.intake.names import fix_path_for, rejects_path_for, summary_path
from etl.intake.storage import Store
from etl.settings import Settings

log = logging.getLogger("etl.orders.inbox")  # the name operators grep for ("inbox: ...")

PROCESSED, FAILED = "processed", "failed"


def open_inbox(settings: Settings) -> Store:
    """The inbox's store (a local folder or an fsspec URL: etl.intake.storage), its folders made."""
    return storage.open_store(settings.inbox, conn_id=settings.inbox_conn_id).ensure(PROCESSED, FAILED)


def _is_batch_name(name: str) -> bool:
    """Any file whose name ends in .csv (any case, trailing spaces ignored), dotted names such as
    `..csv` included: an odd name is processed, not ignored. Our own reject reports are not."""
    name = name.rstrip().lower()
    return name.endswith(".csv") and not name.endswith(".rejects.csv")


def _why_not_a_batch(name: str) -> str:
    if name.rstrip().lower().endswith(".rejects.csv"):
        return "its name ends in .rejects.csv, the name labsync gives its reject reports"
    return "labsync reads files whose name ends in .csv"


def _is_companion(name: str) -> bool:
    """A report labsync writes beside a file while it is processed (left alone, not warned about)."""
    return name.endswith((".summary.html", ".tmp"))


def discover(store: Store, *, settle_seconds: float = 0.0) -> list[str]:
    """CSV files waiting in the inbox (names relative to it), oldest first. A file modified
    within the last `settle_seconds` may still be being copied in and is left for the next run.
    Any other file is left where it is and reported in the log (never silently ignored)."""
    now = time.time()
    found = []
    entries = list(store.files())
    # FILE.fix.csv written beside a FILE.csv still being processed is that file's report, not a
    # batch; once the pair has moved to processed/, a fix file dropped back is a batch like any
    fixes = {fix_path_for(PurePosixPath(e.name)).name for e in entries}
    for entry in entries:
        if entry.name in fixes:
            continue
        if _is_batch_name(entry.name):
            if now - entry.mtime >= settle_seconds:
                found.append((entry.mtime, entry.name))
        elif not _is_companion(entry.name):
            log.warning("inbox: left %s where it is: not a batch file (%s)", entry.name, _why_not_a_batch(entry.name))
    return [name for _, name in sorted(found)]


def fingerprint(store: Store, name: str) -> str:
    """sha256 of the file's bytes: the batch's identity (FileNotFoundError if it is gone)."""
    return store.sha256(name)


def companions(name: str) -> list[str]:
    """The reports labsync writes beside a batch file (they move with it)."""
    path = PurePosixPath(name)
    return [rejects_path_for(path).as_posix(), fix_path_for(path).as_posix(), summary_path(path).as_posix()]


def _free_name(engine: Engine, store: Store, folder: str, name: str, base: str = "") -> str:
    """folder/name, or folder/stem.2.csv, … if taken (never overwrite an earlier file), or
    promised to another batch's unfinished move."""
    stem, suffix = PurePosixPath(name).stem, PurePosixPath(name).suffix
    target, n = f"{folder}/{name}", 2
    while store.exists(target) or records.move_target_taken(engine, base + target):
        target = f"{folder}/{stem}.{n}{suffix}"
        n += 1
    return target


def _renamed(companion: str, src: str, target: str) -> str:
    """`orders.rejects.csv` beside `orders.csv` -> `processed/orders.2.rejects.csv` beside the target."""
    base = PurePosixPath(companion).name.replace(PurePosixPath(src).stem, PurePosixPath(target).stem, 1)
    return str(PurePosixPath(target).with_name(base))


def move(engine: Engine, settings: Settings, store: Store, batch_id: int, src: str, folder: str, *,
         owner: str, base: str = "", reports: list[str] | None = None) -> str | None:
    """Move a batch file and its reports into `folder` (names relative to `store`); None if the
    file is gone (another run moved it first: that is fine). `reports`: the files beside it that
    move with it (default: its reject report and summary).

    Object stores cannot rename, so a move is a copy then a delete. The move is recorded in the
    warehouse (batch_files.moving_from/moving_to, fenced by our claim) before the copy, so a run
    that dies between copy and delete leaves a move the next run finishes to the same place: the
    file never ends up twice in processed/, and is never lost. `base`: the store's path inside
    the inbox (`intents/`), so the recorded names are the inbox's. The caller clears the record
    when it releases the batch (records.release_batch)."""
    row = records.get(engine, batch_id)
    if row["moving_from"] == base + src and row["moving_to"]:  # a move a run died in
        target = row["moving_to"].removeprefix(base)
        log.info("inbox: finishing the interrupted move of %s to %s", src, target)
    else:
        if not store.exists(src):
            return None
        target = _free_name(engine, store, folder, PurePosixPath(src).name, base)
        records.begin_move(engine, batch_id, base + src, base + target,
                           fence=records.fence(batch_id, owner=owner, lease=timedelta(seconds=settings.lease_seconds)))
    try:
        store.copy(src, target)
    except FileNotFoundError:
        if not store.exists(target):  # gone before we copied it: not ours to move any more
            return None
        # else: copied and deleted by the run that died; only the record was left to finish
    pairs = [(c, _renamed(c, src, target)) for c in (companions(src) if reports is None else reports)]
    for companion, moved in pairs:
        with contextlib.suppress(FileNotFoundError):
            store.copy(companion, moved)
    for companion, _ in pairs:
        store.delete(companion)
    store.delete(src)
    return target


def write_summary(store: Store, batch_file: str, page: str) -> str:
    """The summary page beside a batch file (a whole-object PUT on an object store)."""
    name = summary_path(PurePosixPath(batch_file)).as_posix()
    store.write_text(name, page)
    return name
