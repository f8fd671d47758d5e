"""How one page of Rupa resources lands in the warehouse, in the caller's transaction, at the same
speed on SQLite and PostgreSQL.

Why not SQLAlchemy Core here: per row it runs each value through the column type's bind
processor (the JSON columns serialise every record a second time, each timestamp is formatted),
which was most of an extraction's CPU. Here each record is serialised once (`Record`: the same
JSON text feeds the content hash and the JSON columns) and the page goes to the driver as plain
tuples or arrays:

- PostgreSQL, while every row is new (a first extraction, or the pages past the end of the last
  one): the page is `COPY`ed straight into the table, inside a savepoint, with no lookup; its
  text is built here, the JSON columns as serialised. About 40 % less time a row than the upsert
  below (the server parses no JSON array and makes no recordset). A row that is already there
  (another run got there first, a page shifted, a deleted row came back) fails the `COPY` with a
  unique violation: the savepoint is rolled back and the page takes the path below, which then
  decides the following pages too, until a page is all new again.
- PostgreSQL otherwise: two statements a page, each with JSON text parameters: one reads which ids are
  already there (`id = ANY(ARRAY(SELECT json_array_elements_text(...)))`, an index scan), one
  upserts the new and changed rows (one JSON array, each record's JSON text spliced in, not
  re-serialised, unpacked by `json_to_recordset`) and moves `last_seen_at` of the unchanged.
  Measured against the alternatives: `id IN (...)` plus executemany (per-row parameter
  handling in Python), arrays through `unnest` (psycopg quotes array elements in Python), `COPY`
  into a temp table to upsert from (its truncation at every commit cost more than the statements), and one
  statement rewriting every row of the page (re-runs, where nearly every row is unchanged,
  were 2x slower than touching `last_seen_at` alone). No statement is server-prepared (`prepare=False`): psycopg prepares a statement
  after five runs and PostgreSQL may then keep a generic plan chosen while the table was empty,
  a sequential scan that made each page's `id IN (...)` lookup ~20 ms on a 200k-row table.
- SQLite (in process, no round trips): lookups by `IN (?, ...)` in chunks of 500 ids,
  `executemany` of `INSERT ... ON CONFLICT` for new and changed rows, `last_seen_at` for the
  others; timestamps are formatted by SQLAlchemy's own SQLite processor, so the stored text is
  what Core would have written and reads back the same.

Either way the SQL names come from the `Table` in `etl/warehouse/tables.py`; the first sighting
(`first_seen_at`) of an existing row is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Table

LOOKUP_CHUNK = 500  # ids per IN (...) on SQLite

_dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode
_dumps_text = json.JSONEncoder().encode  # a str or None as a JSON value
# COPY's text format: a backslash, tab, newline or carriage return inside a value is escaped
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_ESCAPE_NEEDED = re.compile(r"[\\\n\r]")  # (and a tab, found by counting them)
_UNIQUE_VIOLATION = "23505"  # SQLSTATE
_NUL_JSON = "\\u0000"  # U+0000 as the JSON text holds it


@dataclass(frozen=True, slots=True)
class Record:
    """One resource, ready to write: its typed columns, its JSON text (serialised once) and the
    hash of that text."""

    id: str
    typed: tuple  # the stream's typed columns, in the order the writer was given
    attributes: str  # JSON text
    relationships: str  # JSON text
    content_sha256: str
    updated_at: datetime | None
    updated_raw: str | None  # attributes.updated_at as the API gave it (for the watermark)
    nul_replaced: bool = False  # it held U+0000, stored as U+FFFD (the caller says so, once)


def timestamp(value: object) -> datetime | None:
    """An API timestamp as an aware UTC datetime; None when missing or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def record_for(resource: dict, typed: Callable[[dict], tuple]) -> Record:
    """The Record of one JSON:API resource. The hash covers exactly the text
    `{"attributes":...,"relationships":...}` (sorted keys, no spaces): the same bytes the previous
    writer hashed, so rows already in the warehouse keep their hash."""
    attrs = resource.get("attributes")
    attrs = attrs if isinstance(attrs, dict) else {}
    rels = resource.get("relationships")
    rels = rels if isinstance(rels, dict) else {}
    a_text, r_text = _dumps(attrs), _dumps(rels)
    rid = str(resource["id"])
    if _NUL_JSON in a_text or _NUL_JSON in r_text or "\x00" in rid:  # a substring test: ~0.1 us a row
        attrs, rels, rid = _without_nul(attrs), _without_nul(rels), _without_nul(rid)
        a_text, r_text = _dumps(attrs), _dumps(rels)
        nul = True
    else:
        nul = False
    canonical = '{"attributes":' + a_text + ',"relationships":' + r_text + "}"
    raw = attrs.get("updated_at")
    return Record(
        id=rid,
        typed=typed(attrs),
        attributes=a_text,
        relationships=r_text,
        content_sha256=hashlib.sha256(canonical.encode()).hexdigest(),
        updated_at=timestamp(raw),
        updated_raw=str(raw) if raw else None,
        nul_replaced=nul,
    )


def _without_nul(value):
    """The value with every U+0000, in any string or key at any depth, made U+FFFD (the
    replacement character). PostgreSQL's text and jsonb reject U+0000, so a vendor's "\\u0000"
    failed the whole extraction there; it is replaced on SQLite too, so that both warehouses hold
    and hash the same."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


def classify(records: dict[str, Record], existing: dict[str, tuple[str, bool]]) -> tuple[list[Record], list[str], int]:
    """(new or changed records, ids of unchanged ones, how many are new). A row marked deleted
    that comes back counts as changed."""
    changed: list[Record] = []
    unchanged: list[str] = []
    new = 0
    for rid, rec in records.items():
        prev = existing.get(rid)
        if prev is not None and prev[0] == rec.content_sha256 and not prev[1]:
            unchanged.append(rid)
            continue
        new += prev is None
        changed.append(rec)
    return changed, unchanged, new


class PageWriter:
    """Writes pages of one table through one connection, each inside the caller's transaction
    (`with conn.begin(): writer.apply(...)`)."""

    def __init__(self, conn: Connection, table: Table, typed: Sequence[str]) -> None:
        self.conn = conn
        self.table = table
        self.dialect = conn.dialect.name
        if self.dialect not in ("postgresql", "sqlite"):  # pragma: no cover - the two warehouses
            raise NotImplementedError(f"extraction does not support {self.dialect}")
        dbapi = conn.connection.driver_connection
        assert dbapi is not None  # None only once the connection is closed or invalidated
        self._dbapi = dbapi
        self._cursor = self._dbapi.cursor()
        prep = conn.dialect.identifier_preparer
        q = prep.quote
        self._name = prep.format_table(table)
        self._data_cols = ["id", *typed, "attributes", "relationships", "content_sha256", "updated_at"]
        cols = [*self._data_cols, "first_seen_at", "last_seen_at", "deleted_at"]
        for c in cols:
            table.c[c]  # noqa: B018 - a KeyError here if tables.py no longer has the column
        self._cols = ", ".join(q(c) for c in cols)
        self._set = ", ".join(f"{q(c)} = excluded.{q(c)}" for c in cols if c not in ("id", "first_seen_at"))
        self._q = q
        if self.dialect == "sqlite":
            self._ts = table.c.last_seen_at.type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
        else:
            # attributes/relationships come out of the recordset as json (kept as text, checked)
            # and become jsonb on the way into the table: parsed into jsonb once, not twice (~12 %
            # of the statement's server time on a 500-row page)
            types = ["text"] * (1 + len(typed)) + ["json", "json", "text", "timestamptz"]
            defs = ", ".join(f"{q(c)} {t}" for c, t in zip(self._data_cols, types, strict=True))
            data = ", ".join(q(c) for c in self._data_cols)
            ident = q("id")
            ids = "SELECT json_array_elements_text(%s::json)"
            self._lookup_sql = (f"SELECT {ident}, {q('content_sha256')}, {q('deleted_at')} IS NOT NULL "
                                f"FROM {self._name} WHERE {ident} = ANY(ARRAY({ids}))")
            self._write_sql = (
                f"WITH page AS (SELECT * FROM json_to_recordset(%s::json) AS r({defs})), "
                f"put AS (INSERT INTO {self._name} ({self._cols}) SELECT {data}, %s, %s, NULL FROM page "
                f"ON CONFLICT ({ident}) DO UPDATE SET {self._set}) "
                f"UPDATE {self._name} SET {q('last_seen_at')} = %s WHERE {ident} = ANY(ARRAY({ids}))")
            self._copy_sql = f"COPY {self._name} ({self._cols}) FROM STDIN"
            self._all_new = False  # the last page was all new rows: COPY the next one
            keys = ",".join(f"{json.dumps(c)}:%s" for c in ["id", *typed])
            self._row_json = ("{" + keys + ',"attributes":%s,"relationships":%s,"content_sha256":"%s",'
                              '"updated_at":%s}')

    def apply(self, records: dict[str, Record], seen_at: datetime) -> tuple[int, int, int]:
        """Write one page: new and changed rows in full, `last_seen_at` for the others.
        Returns (inserted, updated, unchanged)."""
        if not records:
            return 0, 0, 0
        if self.dialect == "postgresql":
            return self._apply_postgres(records, seen_at)
        return self._apply_sqlite(records, seen_at)

    def close(self) -> None:
        self._cursor.close()

    # ---- PostgreSQL: JSON parameters, two statements -----------------------------------------------
    def _apply_postgres(self, records: dict[str, Record], seen_at: datetime) -> tuple[int, int, int]:
        """Two round trips for the page. First the ids already there (the ids go as one JSON
        array). Then one statement upserts the new and changed rows (sent as one JSON array,
        each record's JSON text spliced in as serialised, never parsed back) and moves
        last_seen_at of the unchanged ones, which on a re-run are nearly all of them."""
        if self._all_new and self._copy(records, seen_at):
            return len(records), 0, 0
        d = _dumps_text
        self._cursor.execute(self._lookup_sql, (d(list(records)),), prepare=False)
        existing = {rid: (sha, deleted) for rid, sha, deleted in self._cursor.fetchall()}
        changed, unchanged, new = classify(records, existing)
        fmt = self._row_json
        rows = ",".join(fmt % (d(r.id), *map(d, r.typed), r.attributes, r.relationships, r.content_sha256,
                               d(r.updated_at.isoformat()) if r.updated_at is not None else "null")
                        for r in changed)
        self._cursor.execute(self._write_sql, ("[" + rows + "]", seen_at, seen_at, seen_at, d(unchanged)),
                             prepare=False)
        self._all_new = new == len(records)
        return new, len(changed) - new, len(unchanged)

    def _copy(self, records: dict[str, Record], seen_at: datetime) -> bool:
        """COPY the page into the table as new rows, inside a savepoint (left to the commit to
        release). False, with nothing written, when one of its ids is already in the table."""
        cur = self._cursor
        cur.execute("SAVEPOINT labsync_page", prepare=False)
        try:
            with cur.copy(self._copy_sql) as copy:
                copy.write(_copy_text(records, seen_at))
        except Exception as exc:
            if getattr(exc, "sqlstate", None) != _UNIQUE_VIOLATION:
                raise
            cur.execute("ROLLBACK TO SAVEPOINT labsync_page", prepare=False)
            self._all_new = False
            return False
        # no RELEASE: the commit releases the savepoint, and a round trip less a page matters:
        # each one waits for the server and then for the GIL (held by the thread building the
        # next pages). At 20k patients, page size 100: PostgreSQL/SQLite 0.90-0.91 -> 0.96-1.06
        return True

    # ---- SQLite: executemany in process ------------------------------------------------------------
    def _apply_sqlite(self, records: dict[str, Record], seen_at: datetime) -> tuple[int, int, int]:
        q, cur, ts = self._q, self._cursor, self._ts
        existing: dict[str, tuple[str, bool]] = {}
        for chunk in _chunks(records):
            cur.execute(f"SELECT {q('id')}, {q('content_sha256')}, {q('deleted_at')} IS NOT NULL "
                        f"FROM {self._name} WHERE {q('id')} IN ({', '.join('?' * len(chunk))})", chunk)
            existing.update((rid, (sha, bool(deleted))) for rid, sha, deleted in cur.fetchall())
        changed, unchanged, new = classify(records, existing)
        seen = ts(seen_at) if ts else seen_at
        if changed:
            marks = ", ".join("?" * (len(self._data_cols) + 3))
            cur.executemany(
                f"INSERT INTO {self._name} ({self._cols}) VALUES ({marks}) "
                f"ON CONFLICT ({q('id')}) DO UPDATE SET {self._set}",
                [(r.id, *r.typed, r.attributes, r.relationships, r.content_sha256,
                  ts(r.updated_at) if ts and r.updated_at is not None else r.updated_at, seen, seen, None)
                 for r in changed])
        for chunk in _chunks(unchanged):
            cur.execute(f"UPDATE {self._name} SET {q('last_seen_at')} = ? "
                        f"WHERE {q('id')} IN ({', '.join('?' * len(chunk))})", [seen, *chunk])
        return new, len(changed) - new, len(unchanged)


def _copy_text(records: dict[str, Record], seen_at: datetime) -> str:
    """The page in COPY's text format: a line a row, tab-separated, \\N for NULL, in the column
    order of PageWriter._cols. The JSON columns need only their backslashes doubled: JSON text
    holds no raw tab, newline or carriage return. The id and typed columns are escaped only when
    one of them holds a NULL or a character to escape (a check of the row's joined text, ~10x
    cheaper than escaping each value)."""
    seen = seen_at.isoformat()
    tail = f"\t{seen}\t{seen}\t\\N\n"
    lines = []
    for r in records.values():
        head = (r.id, *r.typed)
        try:
            text = "\t".join(head)
        except TypeError:  # a NULL among them
            text = None
        if text is None or text.count("\t") != len(head) - 1 or _ESCAPE_NEEDED.search(text):
            text = "\t".join("\\N" if v is None else v.translate(_COPY_ESCAPES) for v in head)
        lines.append("\t".join((text, r.attributes.replace("\\", "\\\\"), r.relationships.replace("\\", "\\\\"),
                                r.content_sha256, "\\N" if r.updated_at is None else r.updated_at.isoformat()))
                     + tail)
    return "".join(lines)


def _chunks(ids: Iterable[str]) -> Iterable[list[str]]:
    ids = list(ids)
    for i in range(0, len(ids), LOOKUP_CHUNK):
        yield ids[i:i + LOOKUP_CHUNK]
