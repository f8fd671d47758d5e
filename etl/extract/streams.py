"""Extraction: Rupa patients and lab tests streamed page by page into the warehouse.

How a run stays correct when it is killed at any moment:
- Each write (a page, or the few pages that arrived while the last write ran: see Speed) is ONE
  transaction together with the stream's `sync_state` row (the running counts and the URL of
  the next page). A kill loses at most the pages in flight; the warehouse never holds rows that
  `sync_state` does not account for.
- A run that finds its stream `running` or `failed` with a stored next-page URL resumes there,
  keeping the original run start, so the disappearance check still covers the whole run.
- Disappearance is decided only after the last page, in that page's transaction: every live row
  whose `last_seen_at` is older than the run start gets `deleted_at` (rows are never deleted).

Counting: a row is `inserted` (new id), `updated` (content hash changed, or it reappears after
being marked deleted) or `unchanged` (only `last_seen_at` moves). The hash covers `attributes`
and `relationships`, so any change the API shows is caught. A row on two pages of one write
counts once.

Speed: the next pages are fetched and their records built (serialised, hashed) in a read-ahead
thread (`etl.readahead`, at most AHEAD_PAGES ahead) while the current write runs; the pages that
have arrived by then are written together, up to about GROUP_ROWS rows (on PostgreSQL at page size 100 the round trips
and commit of each page, not its rows, were most of the time; when fetching is the slower side,
each page is still written as it comes). A write is one lookup of its ids, then an upsert of the
new and changed rows and a touch of the unchanged ones (`etl.extract.store`), each record
serialised once, never a server-prepared statement on PostgreSQL. Pages fetched ahead are not
written until the current transaction has committed, so the crash story above is unchanged: a
kill loses at most the pages being written and those fetched ahead, and the next run resumes
from the stored URL.

Memory stays flat: with A pages fetched ahead (GROUP_ROWS' worth, at least 2, at most
AHEAD_PAGES), at most 2A + 1 pages of resources are held at a time (those being written and
those fetched ahead: ~900 rows at page size 100, 2,500 at 500), and existing rows are looked up
by the write's ids only. Two pages ahead even when one page fills a write: a page alone ahead
left the fetching thread waiting whenever a write ran long (PostgreSQL sharing the machine's
cores), 5-10 % of PostgreSQL's rows/s at page size 500 in bench/extract.py.

Watermark: the Rupa API documents no `updated_at` filter for list endpoints, so every run is a
full sync; `sync_state.watermark` records the newest `updated_at` seen, for monitoring and for
an incremental mode should Rupa add a filter.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain
from typing import Any, NamedTuple

from sqlalchemy import Connection, Engine, String, Table, func, select, update

from etl.errors import ConfigError, LabsyncError
from etl.extract.store import PageWriter, Record, record_for
from etl.http import describe_transport_error
from etl.readahead import ReadAhead
from etl.redact import clean
from etl.rupa.client import Page, RupaApiError, RupaClient, RupaPageLoop, open_client
from etl.settings import Settings
from etl.warehouse import rupa_lab_tests, rupa_patients, sync_state, upsert

log = logging.getLogger(__name__)

# progress(rows_in_this_page, total_if_known)
Progress = Callable[[int, int | None], None]


def _text(value: object, limit: int) -> str | None:
    """A column value: strings as given (cut to the column's size), other types as JSON text."""
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text[:limit]


def _patient_columns(attrs: dict) -> tuple:
    return (_text(attrs.get("first_name"), 200), _text(attrs.get("last_name"), 200),
            _text(attrs.get("birthday"), 10), _text(attrs.get("email"), 320))


def _lab_test_columns(attrs: dict) -> tuple:
    lab = attrs.get("lab_name") or attrs.get("lab_company_name") or attrs.get("lab")
    if isinstance(lab, dict):
        lab = lab.get("name")
    return _text(attrs.get("name"), 500), _text(lab, 500)


@dataclass(frozen=True)
class Stream:
    name: str  # sync_state.stream
    path: str  # list endpoint
    table: Table
    typed: tuple[str, ...]  # the table's typed columns ...
    columns: Callable[[dict], tuple]  # ... and their values from a resource's attributes

    @property
    def id_length(self) -> int:
        """The size of the table's `id` column (a String(n): Rupa's ids are text)."""
        kind = self.table.c.id.type
        assert isinstance(kind, String) and kind.length is not None
        return kind.length


STREAMS: dict[str, Stream] = {
    "patients": Stream("patients", "/patients", rupa_patients,
                       ("first_name", "last_name", "birthday", "email"), _patient_columns),
    "lab_tests": Stream("lab_tests", "/lab_tests", rupa_lab_tests, ("name", "lab_name"), _lab_test_columns),
}


def stream_named(name: str) -> Stream:
    """`patients`, `lab_tests` or `lab-tests`."""
    spec = STREAMS.get(name.replace("-", "_").strip().lower())
    if spec is None:
        raise ConfigError(f"unknown Rupa stream {name!r}; use patients or lab-tests")
    return spec


@dataclass
class SyncSummary:
    """What one run (a resumed run counts from its start) did to one stream."""

    stream: str
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    skipped: int = 0  # resources without a usable id, by this process (never stored)
    nul_replaced: int = 0  # resources whose U+0000 characters were stored as U+FFFD, by this process
    pages: int = 0  # pages fetched by this process
    resumed: bool = False
    seconds: float = 0.0
    watermark: str | None = None

    @property
    def seen(self) -> int:
        return self.inserted + self.updated + self.unchanged

    def line(self) -> str:
        rate = f", {self.pages / self.seconds:.1f} pages/s" if self.seconds > 0 and self.pages else ""
        return (f"{self.stream}: {self.inserted} inserted, {self.updated} updated, "
                f"{self.unchanged} unchanged, {self.deleted} marked deleted"
                f"{f', {self.skipped} skipped (no usable id)' if self.skipped else ''}"
                f"{f', {self.nul_replaced} with NUL stored as U+FFFD' if self.nul_replaced else ''} "
                f"({self.pages} pages in {self.seconds:.1f}s{rate}{', resumed' if self.resumed else ''})")


@dataclass
class _Run:
    started_at: datetime
    resume_url: str | None
    summary: SyncSummary
    counts: dict = field(default_factory=dict)


def row_for(spec: Stream, resource: dict) -> Record:
    """What one JSON:API resource becomes in the warehouse (without the seen/deleted timestamps)."""
    return record_for(resource, spec.columns)


def row_dict(spec: Stream, resource: dict) -> dict:
    """The same as a dict of column values, for writers of one row at a time (the Rupa events)
    that go through etl.warehouse.upsert rather than the page writer."""
    rec = row_for(spec, resource)
    if rec.nul_replaced:
        log.warning(NUL_WARNING, spec.name, 1)
    return {"id": rec.id, **dict(zip(spec.typed, rec.typed, strict=True)),
            "attributes": json.loads(rec.attributes), "relationships": json.loads(rec.relationships),
            "content_sha256": rec.content_sha256, "updated_at": rec.updated_at}


def _aware(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts


# ---- sync_state --------------------------------------------------------------------------------
def _start(engine: Engine, spec: Stream, *, fresh: bool = False) -> _Run:
    """Resume the stream's interrupted run, or start a new one."""
    now = datetime.now(UTC)
    with engine.begin() as conn:
        row = conn.execute(select(sync_state).where(sync_state.c.stream == spec.name)).mappings().first()
        if (not fresh and row is not None and row["status"] in ("running", "failed")
                and row["resume_url"] and row["run_started_at"] is not None):
            summary = SyncSummary(spec.name, row["inserted"], row["updated"], row["unchanged"],
                                  resumed=True, watermark=row["watermark"])
            conn.execute(update(sync_state).where(sync_state.c.stream == spec.name)
                         .values(status="running", error=None))
            return _Run(_aware(row["run_started_at"]), row["resume_url"], summary)
        upsert(conn, sync_state, [dict(
            stream=spec.name, status="running", run_started_at=now, run_finished_at=None,
            resume_url=None, inserted=0, updated=0, unchanged=0, deleted=0, error=None,
            watermark=row["watermark"] if row is not None else None,
        )], key=["stream"])
        return _Run(now, None, SyncSummary(spec.name, watermark=row["watermark"] if row is not None else None))


def _fail(engine: Engine, spec: Stream, exc: BaseException) -> None:
    """Record why the run stopped (no PHI: exception type and our own plain messages only,
    through the redaction point). After a paging loop the resume point is dropped: the next run
    starts over instead of following a looping server's links."""
    reason = str(exc) if isinstance(exc, LabsyncError) else describe_transport_error(exc)
    restart = {"resume_url": None} if isinstance(exc, RupaPageLoop) else {}
    try:
        with engine.begin() as conn:
            conn.execute(update(sync_state).where(sync_state.c.stream == spec.name)
                         .values(status="failed", run_finished_at=datetime.now(UTC),
                                 error=clean(reason), **restart))
    except Exception:  # the warehouse itself may be why we failed; the original error matters more
        log.warning("could not record the failed %s run in sync_state", spec.name)


# ---- one page ------------------------------------------------------------------------------------
GROUP_ROWS = 500  # pages already fetched are written together up to about this many rows
AHEAD_PAGES = 4  # pages fetched ahead at most (a stored next-page URL is never further behind)
MIN_AHEAD = 2  # pages fetched ahead at least, however large


def _usable_id(res: object, limit: int) -> bool:
    """A resource the warehouse can key: an object whose id is a non-empty string or an integer
    that fits the id column (PostgreSQL refuses a longer one, which failed the whole run there)."""
    rid = res.get("id") if isinstance(res, dict) else None
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        return False
    return 0 < len(str(rid)) <= limit


class _Fetched(NamedTuple):
    """A page as the read-ahead thread hands it over."""

    page: Page
    records: dict[str, Record]  # by id, serialised once and hashed
    skipped: int  # resources without a usable id (never stored)
    nul_replaced: int  # records whose U+0000 characters became U+FFFD


def _fetched(spec: Stream, page: Page) -> _Fetched:
    records: dict[str, Record] = {}
    limit = spec.id_length
    skipped = nul = 0
    for res in page.data:
        if _usable_id(res, limit):
            rec = row_for(spec, res)
            records[rec.id] = rec
            nul += rec.nul_replaced
        else:
            skipped += 1
    return _Fetched(page, records, skipped, nul)


def _with_records(spec: Stream, pages: Iterator[Page]) -> Iterator[_Fetched]:
    """Each page with its Records, built in the read-ahead thread: the JSON work of the next
    page runs while this one is written (on PostgreSQL the writing is the server's, in its own
    process: the main thread only waits)."""
    for page in pages:
        yield _fetched(spec, page)


NUL_WARNING = ("%s: %d resource(s) held the character U+0000 (NUL), which PostgreSQL cannot store: "
               "stored as U+FFFD on every warehouse")


def _say_what_was_odd(spec: Stream, group: list[_Fetched], summary: SyncSummary) -> None:
    """One warning a write for the resources skipped, one for those whose NULs were replaced
    (counts only, never a value), and the counts into the summary."""
    skipped = sum(f.skipped for f in group)
    if skipped:
        summary.skipped += skipped
        log.warning("%s: %d resource(s) on %d page(s) had no usable id (missing, empty, not a string "
                    "or integer, or over %d characters) and were skipped", spec.name, skipped, len(group),
                    spec.id_length)
    nul = sum(f.nul_replaced for f in group)
    if nul:
        summary.nul_replaced += nul
        log.warning(NUL_WARNING, spec.name, nul)


def _apply_page(writer: PageWriter, records: dict[str, Record], seen_at: datetime) -> tuple[int, int, int, str | None]:
    """Upsert one page; returns (inserted, updated, unchanged, newest updated_at on the page)."""
    inserted, updated, unchanged = writer.apply(records, seen_at)
    stamps = [r.updated_raw for r in records.values() if r.updated_raw]
    return inserted, updated, unchanged, max(stamps) if stamps else None


def _pages_from(client: RupaClient, engine: Engine, spec: Stream, run: _Run) -> tuple[Iterator[Page], _Run]:
    """The run's pages; a stored next-page URL the server no longer accepts restarts the run."""
    pages = client.pages(spec.path, start_url=run.resume_url)
    try:
        first = next(pages)
    except RupaApiError as exc:
        if not run.resume_url or exc.status not in (400, 404, 410, 422):
            raise
        log.warning("%s: the stored next-page link was refused (HTTP %s); starting over", spec.name, exc.status)
        run = _start(engine, spec, fresh=True)
        pages = client.pages(spec.path)
        first = next(pages)
    return chain([first], pages), run


# ---- public -----------------------------------------------------------------------------------
def extract_stream(engine: Engine, settings: Settings, stream: str, *,
                   client: RupaClient | None = None, progress: Progress | None = None) -> SyncSummary:
    """Run (or finish an interrupted) full sync of one stream (`patients` or `lab_tests`).

    Raises AuthError (exit 2) when Rupa refuses our credentials, ApiError when the API fails
    beyond the retry policy; either way `sync_state` says `failed` and the next run resumes.
    """
    spec = stream_named(stream)
    own = client is None
    if own:
        client = open_client(settings, engine)
    assert client is not None
    t0 = time.monotonic()
    stack = ExitStack()
    try:
        run = _start(engine, spec)
        if run.summary.resumed:
            log.info("%s: resuming the interrupted run", spec.name)
        pages, run = _pages_from(client, engine, spec, run)
        summary = run.summary
        ahead = ReadAhead(_with_records(spec, pages), name=f"rupa-{spec.name}-pages",
                          ahead=min(AHEAD_PAGES, max(MIN_AHEAD, GROUP_ROWS // settings.rupa.page_size)))
        stack.callback(ahead.close)
        conn = stack.enter_context(engine.connect())  # one session for the run, a transaction a write
        writer = PageWriter(conn, spec.table, spec.typed)
        stack.callback(writer.close)
        for first in ahead:
            # the pages that arrived while the last write ran go in this one write (small pages
            # on a busy database: the round trips and commits of a page, not its rows, were
            # most of PostgreSQL's time at page size 100)
            group = [first, *ahead.ready()] if first.page.next_url is not None else [first]
            page = group[-1].page
            records = first.records
            if len(group) > 1:
                records = {}
                for fetched in group:
                    records.update(fetched.records)
            _say_what_was_odd(spec, group, summary)
            # never stamp a row earlier than the run start, even if this host's clock is behind
            seen_at = max(datetime.now(UTC), run.started_at)
            with conn.begin():
                ins, upd, same, newest = _apply_page(writer, records, seen_at)
                summary.inserted += ins
                summary.updated += upd
                summary.unchanged += same
                if newest and (summary.watermark is None or newest > summary.watermark):
                    summary.watermark = newest
                values: dict[str, Any] = dict(
                    inserted=summary.inserted, updated=summary.updated, unchanged=summary.unchanged,
                    watermark=summary.watermark, resume_url=page.next_url)
                if page.next_url is None:
                    summary.deleted = _mark_disappeared(conn, spec, run.started_at, seen_at)
                    done = datetime.now(UTC)
                    values.update(status="succeeded", deleted=summary.deleted, run_finished_at=done,
                                  last_success_at=done, error=None)
                conn.execute(update(sync_state).where(sync_state.c.stream == spec.name).values(**values))
            for fetched in group:
                summary.pages += 1
                log.debug("%s: page %d stored (%d resources)", spec.name, summary.pages, len(fetched.page.data))
                if progress is not None:
                    progress(len(fetched.page.data), fetched.page.total)
    except BaseException as exc:
        stack.close()  # stop fetching before recording the failure
        _fail(engine, spec, exc)
        raise
    finally:
        stack.close()
        if own:
            client.close()
    summary.seconds = time.monotonic() - t0
    log.info("%s", summary.line())
    return summary


def _mark_disappeared(conn: Connection, spec: Stream, run_started_at: datetime, now: datetime) -> int:
    table = spec.table
    result = conn.execute(update(table)
                          .where(table.c.deleted_at.is_(None), table.c.last_seen_at < run_started_at)
                          .values(deleted_at=now))
    return int(result.rowcount or 0)


def extract_all(engine: Engine, settings: Settings, streams: tuple[str, ...] = ("patients", "lab_tests"), *,
                progress: Callable[[str], Progress] | None = None) -> list[SyncSummary]:
    """Each stream in turn with one client (one token refresh serves them all)."""
    with open_client(settings, engine) as client:
        return [extract_stream(engine, settings, s, client=client,
                               progress=progress(s) if progress else None) for s in streams]


def live_count(engine: Engine, stream: str) -> int:
    """Rows of a stream not marked deleted (for summaries and tests)."""
    table = stream_named(stream).table
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(table.c.deleted_at.is_(None))).scalar_one())
