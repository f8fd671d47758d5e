"""The extraction write path on SQLite and PostgreSQL: counts, what is stored, the content hash
kept from the previous writer, no server-prepared statements, PostgreSQL's COPY of new pages
and its way back to the upsert; and the one-page read-ahead."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from etl.extract.store import PageWriter
from etl.extract.streams import STREAMS, row_for
from etl.readahead import ReadAhead
from etl.warehouse import rupa_patients

SPEC = STREAMS["patients"]


def resource(i: int, **attrs) -> dict:
    return {"type": "patient", "id": f"pat_{i:04d}",
            "attributes": {"first_name": "Ada", "last_name": f"L{i}", "birthday": "1990-01-02",
                           "email": f"p{i}@example.test", "updated_at": "2025-03-04T05:06:07Z",
                           "tags": ["x", {"b": 1, "a": 2}], **attrs},
            "relationships": {"clinic": {"data": {"type": "clinic", "id": "c1"}}}}


def aware(ts: datetime | None) -> datetime | None:
    """SQLite gives back naive UTC timestamps (as SQLAlchemy always stored them there)."""
    return ts.replace(tzinfo=UTC) if ts is not None and ts.tzinfo is None else ts


def page(writer: PageWriter, conn, resources: list[dict], seen: datetime) -> tuple[int, int, int]:
    with conn.begin():
        return writer.apply({r["id"]: row_for(SPEC, r) for r in resources}, seen)


def test_the_content_hash_is_the_one_the_previous_writer_stored():
    res = resource(1, note="é ü \"quoted\"")
    previous = hashlib.sha256(json.dumps({"attributes": res["attributes"], "relationships": res["relationships"]},
                                         sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert row_for(SPEC, res).content_sha256 == previous


def test_pages_are_counted_and_stored_the_same_on_both_warehouses(engine):
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    with engine.connect() as conn:
        writer = PageWriter(conn, SPEC.table, SPEC.typed)
        assert page(writer, conn, [resource(i) for i in range(5)], t0) == (5, 0, 0)
        assert page(writer, conn, [resource(i) for i in range(5)], t0 + timedelta(hours=1)) == (0, 0, 5)
        changed = [resource(0, last_name="Renamed"), *[resource(i) for i in range(1, 5)], resource(9)]
        assert page(writer, conn, changed, t0 + timedelta(hours=2)) == (1, 1, 4)
        with conn.begin():
            conn.execute(sa.update(rupa_patients).where(rupa_patients.c.id == "pat_0002")
                         .values(deleted_at=t0 + timedelta(hours=2)))
        assert page(writer, conn, [resource(2)], t0 + timedelta(hours=3)) == (0, 1, 0)  # back to life
        writer.close()
    with engine.connect() as conn:
        rows = {r["id"]: {k: aware(v) if isinstance(v, datetime) else v for k, v in r.items()}
                for r in conn.execute(sa.select(rupa_patients)).mappings()}
    first = rows["pat_0000"]
    assert (first["last_name"], first["first_name"], first["birthday"], first["email"]) == (
        "Renamed", "Ada", "1990-01-02", "p0@example.test")
    assert first["attributes"] == resource(0, last_name="Renamed")["attributes"]
    assert first["relationships"]["clinic"]["data"]["id"] == "c1"
    assert first["first_seen_at"] == t0 and first["last_seen_at"] == t0 + timedelta(hours=2)
    assert first["updated_at"] == datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert rows["pat_0003"]["last_seen_at"] == t0 + timedelta(hours=2)  # unchanged: seen again
    assert rows["pat_0003"]["first_seen_at"] == t0
    assert rows["pat_0002"]["deleted_at"] is None and rows["pat_0002"]["last_seen_at"] == t0 + timedelta(hours=3)
    assert rows["pat_0009"]["first_seen_at"] == t0 + timedelta(hours=2)


def _count_copies(monkeypatch) -> list[int]:
    """How many pages went to COPY (PostgreSQL's path while every row is new): each builds its
    COPY text once."""
    from etl.extract import store

    copies: list[int] = []
    real = store._copy_text

    def counted(*args):
        copies.append(1)
        return real(*args)
    monkeypatch.setattr(store, "_copy_text", counted)
    return copies


HOSTILE = {"first_name": "Tab\there", "last_name": "New\nline\r\\back", "email": "\\N",
           "note": "\\ \" \t é 😀", "tags": ["\\x", {"z": "\n"}]}


def test_pages_of_new_rows_are_copied_and_read_back_exactly(engine, monkeypatch):
    """After a page of only new rows, PostgreSQL COPYs the next: tabs, newlines, carriage
    returns, backslashes, a literal \\N and NULLs in the typed and JSON columns must come back
    as sent, the same as on SQLite. A page that repeats ids then fails the COPY and is counted
    as unchanged (the savepoint rolled back, the transaction still usable)."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    hostile = [resource(10, **HOSTILE, birthday=None), resource(11, **HOSTILE), resource(12, first_name="Only\ta tab"),
               resource(13, updated_at="not a time"), resource(14, last_name="No\\tab\nbut\rthese")]
    with engine.connect() as conn:
        writer = PageWriter(conn, SPEC.table, SPEC.typed)
        copies = _count_copies(monkeypatch)
        assert page(writer, conn, [resource(i) for i in range(3)], t0) == (3, 0, 0)
        assert page(writer, conn, hostile, t0) == (5, 0, 0)
        assert page(writer, conn, hostile, t0 + timedelta(hours=1)) == (0, 0, 5)
        writer.close()
        rows = {r["id"]: r for r in conn.execute(sa.select(rupa_patients)).mappings()}
    assert len(copies) == (2 if engine.dialect.name == "postgresql" else 0)  # the second page copied; the third tried, then upserted
    assert len(rows) == 8
    got = rows["pat_0011"]
    assert (got["first_name"], got["last_name"], got["email"], got["birthday"]) == (
        "Tab\there", "New\nline\r\\back", "\\N", "1990-01-02")
    assert (rows["pat_0010"]["last_name"], rows["pat_0010"]["birthday"]) == ("New\nline\r\\back", None)
    assert rows["pat_0012"]["first_name"] == "Only\ta tab"
    assert rows["pat_0014"]["last_name"] == "No\\tab\nbut\rthese"
    assert got["attributes"] == resource(11, **HOSTILE)["attributes"]
    assert got["relationships"] == resource(11)["relationships"]
    assert got["content_sha256"] == row_for(SPEC, resource(11, **HOSTILE)).content_sha256
    assert aware(got["updated_at"]) == datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert rows["pat_0013"]["updated_at"] is None
    assert aware(got["first_seen_at"]) == t0 and aware(got["last_seen_at"]) == t0 + timedelta(hours=1)
    assert got["deleted_at"] is None


def test_a_row_written_by_someone_else_meanwhile_sends_the_page_back_to_the_upsert(engine, monkeypatch):
    """Another run stores one of the ids between two pages: the COPY fails on it, the page is
    upserted instead (that row counted unchanged, the others new) and the writer keeps working."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    with engine.connect() as conn, engine.connect() as other:
        writer = PageWriter(conn, SPEC.table, SPEC.typed)
        copies = _count_copies(monkeypatch)
        assert page(writer, conn, [resource(i) for i in range(3)], t0) == (3, 0, 0)
        theirs = PageWriter(other, SPEC.table, SPEC.typed)
        assert page(theirs, other, [resource(4)], t0) == (1, 0, 0)
        theirs.close()
        assert page(writer, conn, [resource(i) for i in range(3, 7)], t0) == (3, 0, 1)
        assert page(writer, conn, [resource(i) for i in range(7, 9)], t0) == (2, 0, 0)
        assert page(writer, conn, [resource(i) for i in range(9, 11)], t0) == (2, 0, 0)
        writer.close()
        assert conn.execute(sa.select(sa.func.count()).select_from(rupa_patients)).scalar_one() == 11
    assert len(copies) == (2 if engine.dialect.name == "postgresql" else 0)  # tried after page 1 (failed), then after page 3 (all new again)


@pytest.mark.postgres
def test_no_statement_is_ever_server_prepared(pg_admin_url):
    """psycopg prepares a statement after five runs; a generic plan chosen while the table was
    empty then made each page's lookup a sequential scan. Twenty pages, nothing prepared."""
    from etl import warehouse
    from tests.conftest import migrated
    from tests.pgserver import create_database

    engine = warehouse.connect(migrated(create_database(pg_admin_url)))
    try:
        with engine.connect() as conn:
            writer = PageWriter(conn, SPEC.table, SPEC.typed)
            for p in range(20):
                page(writer, conn, [resource(p * 10 + i) for i in range(10)], datetime.now(UTC))
            writer.close()
            prepared = conn.exec_driver_sql("SELECT count(*) FROM pg_prepared_statements").scalar_one()
            assert prepared == 0
            assert conn.execute(sa.select(sa.func.count()).select_from(rupa_patients)).scalar_one() == 200
    finally:
        engine.dispose()


def test_read_ahead_yields_in_order_then_raises_the_sources_error():
    def source():
        yield from range(5)
        raise ValueError("page 6 failed")

    got = []
    with pytest.raises(ValueError, match="page 6 failed"):
        for item in ReadAhead(source()):
            got.append(item)
    assert got == [0, 1, 2, 3, 4]


class _Counted:
    """A source that records each item it begins, so a test can wait for a count or rule out more."""

    def __init__(self, n: int, error: Exception | None = None) -> None:
        self.n, self.error, self.begun = n, error, 0
        self.changed = threading.Condition()

    def __iter__(self):
        for i in range(self.n):
            with self.changed:
                self.begun += 1
                self.changed.notify_all()
            yield i
        if self.error is not None:
            raise self.error

    def reaches(self, count: int) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.begun >= count, timeout=10)

    def stays_at(self, count: int) -> bool:
        with self.changed:
            return not self.changed.wait_for(lambda: self.begun > count, timeout=0.5)


def test_read_ahead_fetches_one_item_ahead_and_stops_when_closed():
    source = _Counted(100)
    ahead = ReadAhead(iter(source))
    items = iter(ahead)
    assert next(items) == 0
    # while item 0 is being used, item 1 is fetched; item 2 is not begun
    assert source.reaches(2) and source.stays_at(2)
    assert next(items) == 1
    # item 1 taken: item 2 is fetched while it is used, and no more
    assert source.reaches(3) and source.stays_at(3)
    ahead.close()
    time.sleep(0.5)
    assert source.begun == 3  # nothing more is fetched after close()


def test_read_ahead_of_several_hands_over_what_has_arrived_and_keeps_an_error_for_last():
    source = _Counted(6, ValueError("page 7 is broken"))
    ahead = ReadAhead(iter(source), ahead=3)
    items = iter(ahead)
    assert next(items) == 0
    assert source.reaches(4) and source.stays_at(4)  # room for three more while item 0 is used
    time.sleep(0.2)
    assert ahead.ready() == [1, 2, 3]  # what has arrived, without waiting
    assert next(items) == 4
    assert source.reaches(6)
    time.sleep(0.2)
    assert ahead.ready() == [5]  # the error waits behind the items before it
    with pytest.raises(ValueError, match="page 7"):
        next(items)
    ahead.close()


def test_a_nul_character_is_stored_as_the_replacement_character_on_both_warehouses(engine, monkeypatch):
    """PostgreSQL's text and jsonb cannot hold U+0000 (a vendor's JSON may carry "\\u0000"): such
    a page used to fail the whole extraction there. Every NUL, in a typed column, deep in the
    JSON, in a key or in the id, is stored as U+FFFD on both warehouses, on both PostgreSQL paths
    (the upsert of the first page, the COPY of the next), and the row hashes the same each run."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    nul = {"first_name": "A\x00da", "note": {"k\x00": ["x\x00y", 1]}}
    ok = "A\ufffdda", {"k\ufffd": ["x\ufffdy", 1]}
    with engine.connect() as conn:
        writer = PageWriter(conn, SPEC.table, SPEC.typed)
        copies = _count_copies(monkeypatch)
        assert page(writer, conn, [resource(1, **nul)], t0) == (1, 0, 0)
        assert page(writer, conn, [resource(2, **nul), {**resource(3, **nul), "id": "pat_\x003"}], t0) == (2, 0, 0)
        assert page(writer, conn, [resource(1, **nul), resource(2, **nul)], t0) == (0, 0, 2)  # same hash
        writer.close()
        rows = {r["id"]: r for r in conn.execute(sa.select(rupa_patients)).mappings()}
    assert len(copies) == (2 if engine.dialect.name == "postgresql" else 0)  # the second page copied; the third tried
    assert sorted(rows) == ["pat_0001", "pat_0002", "pat_\ufffd3"]
    for row in rows.values():
        assert (row["first_name"], row["attributes"]["note"]) == ok
    replaced, clean = row_for(SPEC, resource(1, **nul)), row_for(SPEC, resource(1, first_name=ok[0], note=ok[1]))
    assert (replaced.nul_replaced, clean.nul_replaced) == (True, False)  # for the caller's one warning a write
    assert replaced.content_sha256 == clean.content_sha256 and replaced.attributes == clean.attributes


def test_pages_written_in_one_transaction_each_roll_back_only_their_own_copy(engine, monkeypatch):
    """The savepoint of a COPY is left for the commit to release: a later page in the same
    transaction whose COPY fails rolls back to its own savepoint, never to an earlier page's,
    so the rows COPYed before it stay."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    with engine.connect() as conn:
        writer = PageWriter(conn, SPEC.table, SPEC.typed)
        copies = _count_copies(monkeypatch)
        def recs(ids: range) -> dict:
            return {r["id"]: row_for(SPEC, r) for r in (resource(i) for i in ids)}
        with conn.begin():
            assert writer.apply(recs(range(0, 2)), t0) == (2, 0, 0)  # looked up: all new
            assert writer.apply(recs(range(2, 4)), t0) == (2, 0, 0)  # COPYed
            assert writer.apply(recs(range(4, 6)), t0) == (2, 0, 0)  # COPYed
            assert writer.apply(recs(range(5, 8)), t0) == (2, 0, 1)  # COPY fails on pat_0005: upserted
        writer.close()
        ids = sorted(conn.execute(sa.select(rupa_patients.c.id)).scalars())
    assert ids == [f"pat_{i:04d}" for i in range(8)]
    assert len(copies) == (3 if engine.dialect.name == "postgresql" else 0)


def test_an_event_copy_with_a_nul_is_stored_replaced_and_said_without_its_value(caplog):
    """Rupa events write one resource at a time (etl.checkout.events through row_dict): the same
    replacement, and a warning that carries a count, never the value."""
    from etl.extract.streams import row_dict

    row = row_dict(SPEC, resource(1, first_name="Zo\x00e"))
    assert row["first_name"] == "Zo\ufffde" and row["attributes"]["first_name"] == "Zo\ufffde"
    said = [r.getMessage() for r in caplog.records if "U+0000" in r.getMessage()]
    assert len(said) == 1 and "patients: 1 resource(s)" in said[0] and "Zo" not in said[0]
    caplog.clear()
    row_dict(SPEC, resource(2))
    assert not [r for r in caplog.records if "U+0000" in r.getMessage()]
