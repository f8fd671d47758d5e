"""How one page of Rupa resources lands in the warehouse: a lookup, an upsert and a touch, in the
caller's transaction, at the same speed on SQLite and PostgreSQL.

Why not SQLAlchemy Core here: per row it runs each value through the column type's bind
processor (the JSON columns serialise every record a second time, each timestamp is formatted),
which was most of an extraction's CPU. Here each record is serialised once (`Record`: the same
JSON text feeds the content hash and the JSON columns) and the page goes to the driver as plain
tuples or arrays:

- PostgreSQL: `WHERE id = ANY(%s)` with one array parameter, and one
  `INSERT ... SELECT FROM unnest(arrays) ... ON CONFLICT` per page. Statements are never
  server-prepared (`prepare=False`): psycopg prepares a statement after five runs and PostgreSQL
  may then switch to a generic plan chosen while the table was empty, a sequential scan that
  made each page's lookup ~20 ms on a 200k-row table.
- SQLite: `executemany` of `INSERT ... ON CONFLICT` and lookups by `IN (?, ...)` in chunks of
  500 ids; timestamps are formatted by SQLAlchemy's own SQLite processor, so the stored text is
  what Core would have written and reads back the same.

Either way the SQL names come from the `Table` in `etl/warehouse/tables.py`; the first sighting
(`first_seen_at`) of an existing row is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Table

LOOKUP_CHUNK = 500  # ids per IN (...) on SQLite

_dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode


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
    canonical = '{"attributes":' + a_text + ',"relationships":' + r_text + "}"
    raw = attrs.get("updated_at")
    return Record(
        id=str(resource["id"]),
        typed=typed(attrs),
        attributes=a_text,
        relationships=r_text,
        content_sha256=hashlib.sha256(canonical.encode()).hexdigest(),
        updated_at=timestamp(raw),
        updated_raw=str(raw) if raw else None,
    )


class PageWriter:
    """The three statements of a page, for one table and one connection (in its transaction)."""

    def __init__(self, conn: Connection, table: Table, typed: Sequence[str]) -> None:
        self.conn = conn
        self.table = table
        self.typed = list(typed)
        self.dialect = conn.dialect.name
        if self.dialect not in ("postgresql", "sqlite"):  # pragma: no cover - the two warehouses
            raise NotImplementedError(f"extraction does not support {self.dialect}")
        self._cursor = conn.connection.driver_connection.cursor()
        self._ts = table.c.last_seen_at.type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
        name = conn.dialect.identifier_preparer.format_table(table)
        quote = conn.dialect.identifier_preparer.quote
        cols = ["id", *self.typed, "attributes", "relationships", "content_sha256", "updated_at",
                "first_seen_at", "last_seen_at", "deleted_at"]
        for c in cols:
            table.c[c]  # noqa: B018 - KeyError here if tables.py no longer has the column
        keep = [c for c in cols if c not in ("id", "first_seen_at")]
        col_list = ", ".join(quote(c) for c in cols)
        set_list = ", ".join(f"{quote(c)} = excluded.{quote(c)}" for c in keep)
        ident = quote("id")
        if self.dialect == "postgresql":
            casts = ["text"] * (1 + len(self.typed)) + ["jsonb", "jsonb", "text", "timestamptz"]
            arrays = ", ".join(f"%s::{t}[]" for t in casts)
            self._upsert = (
                f"INSERT INTO {name} ({col_list}) SELECT u.*, %s::timestamptz, %s::timestamptz, "
                f"NULL::timestamptz FROM unnest({arrays}) AS u "
                f"ON CONFLICT ({ident}) DO UPDATE SET {set_list}")
            self._lookup = (f"SELECT {ident}, {quote('content_sha256')}, {quote('deleted_at')} IS NOT NULL "
                            f"FROM {name} WHERE {ident} = ANY(%s)")
            self._touch = f"UPDATE {name} SET {quote('last_seen_at')} = %s WHERE {ident} = ANY(%s)"
        else:
            marks = ", ".join("?" * len(cols))
            self._upsert = (f"INSERT INTO {name} ({col_list}) VALUES ({marks}) "
                            f"ON CONFLICT ({ident}) DO UPDATE SET {set_list}")
            self._lookup = (f"SELECT {ident}, {quote('content_sha256')}, {quote('deleted_at')} IS NOT NULL "
                            f"FROM {name} WHERE {ident} IN ")
            self._touch = f"UPDATE {name} SET {quote('last_seen_at')} = ? WHERE {ident} IN "

    def existing(self, ids: Sequence[str]) -> dict[str, tuple[str, bool]]:
        """id -> (content hash, marked deleted) for the ids already in the table."""
        if self.dialect == "postgresql":
            self._cursor.execute(self._lookup, (list(ids),), prepare=False)
            return {rid: (sha, bool(deleted)) for rid, sha, deleted in self._cursor.fetchall()}
        found: dict[str, tuple[str, bool]] = {}
        for chunk in _chunks(ids):
            self._cursor.execute(self._lookup + f"({', '.join('?' * len(chunk))})", chunk)
            found.update((rid, (sha, bool(deleted))) for rid, sha, deleted in self._cursor.fetchall())
        return found

    def write(self, records: Sequence[Record], seen_at: datetime) -> None:
        """Insert new records and replace changed ones (keeping their first sighting)."""
        if not records:
            return
        if self.dialect == "postgresql":
            columns = [[r.id for r in records]]
            columns += [list(col) for col in zip(*(r.typed for r in records), strict=True)] if self.typed else []
            columns += [[r.attributes for r in records], [r.relationships for r in records],
                        [r.content_sha256 for r in records], [r.updated_at for r in records]]
            self._cursor.execute(self._upsert, (seen_at, seen_at, *columns), prepare=False)
            return
        ts = self._ts
        seen = ts(seen_at) if ts else seen_at
        self._cursor.executemany(self._upsert, [
            (r.id, *r.typed, r.attributes, r.relationships, r.content_sha256,
             ts(r.updated_at) if ts and r.updated_at is not None else r.updated_at, seen, seen, None)
            for r in records])

    def touch(self, ids: Sequence[str], seen_at: datetime) -> None:
        """Move `last_seen_at` of unchanged rows."""
        if not ids:
            return
        if self.dialect == "postgresql":
            self._cursor.execute(self._touch, (seen_at, list(ids)), prepare=False)
            return
        seen = self._ts(seen_at) if self._ts else seen_at
        for chunk in _chunks(ids):
            self._cursor.execute(self._touch + f"({', '.join('?' * len(chunk))})", [seen, *chunk])

    def close(self) -> None:
        self._cursor.close()


def _chunks(ids: Iterable[str]) -> Iterable[list[str]]:
    ids = list(ids)
    for i in range(0, len(ids), LOOKUP_CHUNK):
        yield ids[i:i + LOOKUP_CHUNK]
