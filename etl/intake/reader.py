"""Read an order-batch CSV fast, with the exact line number of every record.

Why two readers in one: `csv.reader` has the exact semantics (quoted cells spanning lines, stray
quotes) and true line numbers, but splits lines in Python; pyarrow's CSV parser is many times
faster but cannot say on which line a record began once a cell spans lines. So each block of the
file is classified line by line with vectorised Arrow string kernels, on a view of its bytes:

- FAST: a line that is one whole record with the header's number of cells: no quote at all, or
  only well-formed quoted cells (`"..."` right between commas, inner quotes doubled). All FAST
  lines of a block go to pyarrow's parser in one call, newlines-in-values off, so row i of its
  table is the i-th FAST line and its line number is known.
- BLANK: no quote, and nothing but commas and whitespace: skipped, as blank lines always were.
- EXACT: everything else (a cell that spans lines, a stray quote, the wrong number of cells, the
  header): read from that line on exactly as before (`csv.reader` when the line has a quote,
  else a split on commas), consuming as many continuation lines as the record needs.

The rows of both kinds are merged back in file order, so the result is the same as reading the
whole file the exact way: same rows, same cells, same line numbers. Lines are physical lines
with universal newlines (`\\n`, `\\r\\n` or a lone `\\r`), as Python's text files count them.

Cells come out trimmed (Unicode whitespace: the same set as `str.strip`) with empty cells as
null; a record whose cells are all empty is a blank line and is skipped. A cell that starts with
the apostrophe labsync puts before a formula-like value in the CSVs it writes (etl.intake.csvsafe:
`'+1`, `''x`) loses that one apostrophe, so a fix file (FILE.fix.csv) edited in Excel and dropped
back reads as the values it was written from; `O'Brien` or `'x` are left alone.

`row_of(lines)` gives the row a spreadsheet shows for a record (header = row 1): the line minus
the extra lines taken by the quoted cells that spanned lines before it. A block holds at most
`target_rows` records, and only its bytes are in memory. `cell_at(line, column)` reads one
record again (for the duplicate-id check), through a sparse index of line offsets (one entry
per 64 lines).
"""

from __future__ import annotations

import bisect
import csv
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv

from etl.errors import UnusableInputError
from etl.intake.csvsafe import unsafe_cell

csv.field_size_limit(16 * 1024 * 1024)

BOM = b"\xef\xbb\xbf"
MIN_READ = 64 << 10
MAX_READ = 32 << 20
INDEX_EVERY = 64  # lines between two entries of the offset index

# a well-formed cell: bare (no quote, no comma) or quoted with doubled inner quotes
_QUOTED_CELL = r'"(?:[^"\r\n]|"")*"'
_CELL = rf'(?:[^",\r\n]*|{_QUOTED_CELL})'
_WELL_FORMED = rf"^{_CELL}(?:,{_CELL})*(?:\r\n|\r|\n)?$"
_BLANK = r"^[\s,]*$"  # RE2's \s is ASCII: other whitespace makes a line EXACT, which skips it too

FAST, BLANK, EXACT = 0, 1, 2
# the cells' Arrow type: what pandas' "str" dtype holds, so the validator's frames wrap the
# reader's arrays without a cast (a copy of every column's offsets, in the checking thread)
TEXT = pa.large_string()


@dataclass
class Block:
    """Consecutive records of the file: the rows with the header's width, and the others."""

    lines: np.ndarray  # int64: the first line of each row, ascending
    columns: list[pa.ChunkedArray]  # one per header column: trimmed strings, null where empty
    bad: list[tuple[int, list[str]]] = field(default_factory=list)  # (line, raw cells): wrong width
    spans: list[tuple[int, int]] = field(default_factory=list)  # (line, extra lines) of multi-line records

    @property
    def records(self) -> int:
        return len(self.lines) + len(self.bad)


def line_ends(data: bytes | bytearray, final: bool, start: int = 0) -> np.ndarray:
    """Offsets just past each physical line terminator in `data[start:]` (universal newlines).
    Unless `final`, a `\\r` as the very last byte is left undecided: its `\\n` may still come."""
    view = np.frombuffer(data, dtype=np.uint8)[start:]
    ends = np.flatnonzero(view == 10)
    if data.find(b"\r", start) >= 0:  # most files have none: skip the second pass
        cr = np.flatnonzero(view == 13)
        after = cr + 1
        inside = after < len(view)
        bare = np.full(len(cr), final)
        bare[inside] = view[after[inside]] != 10
        if bare.any():
            ends = np.union1d(ends, cr[bare])
    return ends.astype(np.int64) + (start + 1)


def trim_null(arr: pa.Array) -> pa.Array:
    """Trim whitespace around each cell; an empty cell becomes null. (The parser already makes
    empty cells null: only cells of spaces, and rows read the exact way, are left to do.)"""
    arr = pc.utf8_trim_whitespace(arr)
    empty = pc.equal(arr, "")
    if not pc.any(empty).as_py():
        return arr
    return pc.if_else(empty, pa.scalar(None, arr.type), arr)


# `'` + what csvsafe.safe_cell guards (formula starts, and `'` itself): RE2 has no lookahead, so
# the character after the apostrophe is captured and put back.
_PREFIXED = "^'([=+\\-@\t\r\n\uff1d\uff0b\uff0d\uff20'])"


def unprefix(arr):
    """Remove the apostrophe labsync's CSV writer puts in front of a formula-like cell (only
    when the cell is exactly such a cell: `'+1` -> `+1`, `O'Brien` and `'x` stay)."""
    if arr.null_count == len(arr) or not pc.any(pc.starts_with(arr, "'")).as_py():
        return arr  # nearly always: one cheap first-byte test per column
    return pc.replace_substring_regex(arr, _PREFIXED, "\\1")


def is_blank(cells: list[str]) -> bool:
    return not "".join(cells).strip()


class _Lines:
    """A file from some offset on, as physical lines, read in large pieces."""

    def __init__(self, f: BinaryIO, *, offset: int, first_line: int, read_size: int = 1 << 20) -> None:
        self.f = f
        self.buf = bytearray()
        self.ends = np.zeros(0, dtype=np.int64)  # ends of the complete lines in buf
        self.eof = False
        self.offset = offset  # file offset of buf[0]
        self.first_line = first_line  # line number of buf's first line
        self.read_size = read_size
        f.seek(offset)

    def fill(self, lines: int, *, rows_per_read: int = 0) -> bool:
        """Read until buf holds `lines` complete lines or the file has ended; False when no line
        is left. With `rows_per_read`, each read is sized to hold about that many lines."""
        while len(self.ends) < lines and not self.eof:
            more = self.f.read(self.read_size)
            self.eof = not more
            # scan only what no earlier call has decided: from the end of the last whole line
            done = int(self.ends[-1]) if len(self.ends) else 0
            self.buf += more
            new = line_ends(self.buf, self.eof, done)
            self.ends = np.concatenate((self.ends, new)) if len(self.ends) else new
            if self.eof and len(self.buf) and (not len(self.ends) or self.ends[-1] < len(self.buf)):
                self.ends = np.append(self.ends, len(self.buf))  # the last line, unterminated
            if rows_per_read and len(self.ends):
                per_line = max(1, int(self.ends[-1]) // len(self.ends))
                self.read_size = min(MAX_READ, max(MIN_READ, per_line * rows_per_read))
        return len(self.ends) > 0

    def text(self, i: int) -> str | None:
        """Line i of buf as text, with its terminator (None past the end of the file)."""
        if i >= len(self.ends):
            self.fill(i + 1)
            if i >= len(self.ends):
                return None
        start = int(self.ends[i - 1]) if i else 0
        return self.buf[start:int(self.ends[i])].decode("utf-8")

    def drop(self, n: int) -> None:
        """Forget buf's first n lines."""
        if n <= 0:
            return
        cut = int(self.ends[n - 1])
        del self.buf[:cut]
        self.ends = self.ends[n:] - cut
        self.offset += cut
        self.first_line += n


def _exact(lines: _Lines, i: int, name: str) -> tuple[list[str], int]:
    """The record that starts at line i of `lines`, read the exact way: its cells and how many
    lines it took (a quoted cell may span lines)."""
    used = 0

    def rest() -> Iterator[str]:
        nonlocal used
        while (text := lines.text(i + used)) is not None:
            used += 1
            yield text

    feed = rest()
    first = next(feed, None)
    if first is None:
        return [], 0
    try:
        if '"' in first:
            cells = next(csv.reader(_prepend(first, feed)), [])
        else:
            cells = first.rstrip("\r\n").split(",")
    except csv.Error as exc:
        raise UnusableInputError(f"{name}: line {lines.first_line + i + used - 1} is not valid CSV ({exc})") from None
    return cells, used


def _prepend(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


class Reader:
    """`blocks()`: the records after the header, at most `target_rows` a block."""

    def __init__(self, path: Path, width: int, *, target_rows: int = 20_000, name: str | None = None,
                 exact_only: bool = False) -> None:
        self.path = path
        self.exact_only = exact_only  # every line the exact way: the reference the tests compare with
        self.name = name or path.name
        self.width = width
        self.target_rows = max(1, target_rows)
        self._index_lines: list[int] = []  # line numbers (ascending) ...
        self._index_offsets: list[int] = []  # ... and the file offsets where they start
        self._span_lines: list[int] = []  # first lines of records that spanned lines (ascending) ...
        self._span_extra: list[int] = []  # ... and the extra lines taken up to and including each
        # blocks() may run one block ahead in another thread (etl.readahead) while row_of and
        # cell_at answer for the blocks already handed out: the four lists change together
        self._lock = threading.Lock()

    # ---- blocks ------------------------------------------------------------------------------
    def blocks(self) -> Iterator[Block]:
        with self.path.open("rb") as f:
            bom = f.read(len(BOM)) == BOM
            lines = _Lines(f, offset=len(BOM) if bom else 0, first_line=1)
            while lines.fill(1):  # the first non-blank record is the header: skip it
                first = lines.first_line
                cells, used = _exact(lines, 0, self.name)
                self._span([(first, used - 1)] if used > 1 else [])
                self._drop(lines, used)
                if not is_blank(cells):
                    break
            while lines.fill(self.target_rows, rows_per_read=self.target_rows):
                block, used = self._block(lines, min(len(lines.ends), self.target_rows))
                self._span(block.spans)
                self._drop(lines, used)
                if block.records:
                    yield block

    def _span(self, spans: list[tuple[int, int]]) -> None:
        if not spans:
            return
        with self._lock:
            total = self._span_extra[-1] if self._span_extra else 0
            for line, extra in spans:
                total += extra
                self._span_lines.append(line)
                self._span_extra.append(total)

    def row_of(self, lines) -> np.ndarray:
        """The spreadsheet row (header = 1) of records by their first line; records handed out
        so far only. Equal to the line unless a quoted cell spanned lines before it."""
        lines = np.asarray(lines, dtype=np.int64)
        with self._lock:
            if not self._span_lines:
                return lines
            span_lines = np.asarray(self._span_lines, dtype=np.int64)
            span_extra = np.asarray(self._span_extra, dtype=np.int64)
        k = np.searchsorted(span_lines, lines, side="left")
        return lines - np.concatenate(([0], span_extra))[k]

    def _drop(self, lines: _Lines, n: int) -> None:
        """Drop n lines, remembering where every 64th of them starts."""
        if n <= 0:
            return
        first = lines.first_line
        k = np.arange(0, n, INDEX_EVERY)
        starts = np.concatenate(([0], lines.ends[: n - 1]))[k] + lines.offset
        with self._lock:
            self._index_lines.extend((k + first).tolist())
            self._index_offsets.extend(starts.tolist())
        lines.drop(n)

    def _classify(self, lines: pa.Array) -> np.ndarray:
        """FAST, BLANK or EXACT for each line (see the module docstring)."""
        kind = np.full(len(lines), EXACT, dtype=np.int8)
        quoted = pc.match_substring(lines, '"').to_numpy(zero_copy_only=False)
        cells = pc.count_substring(lines, ",").to_numpy() + 1
        plain = ~quoted
        kind[plain & (cells == self.width)] = FAST
        odd = np.flatnonzero(plain & (cells != self.width))
        if len(odd):
            blank = pc.match_substring_regex(lines.take(pa.array(odd)), _BLANK).to_numpy(zero_copy_only=False)
            kind[odd[blank]] = BLANK
        q = np.flatnonzero(quoted)
        if len(q):
            ql = lines.take(pa.array(q))
            ok = pc.match_substring_regex(ql, _WELL_FORMED).to_numpy(zero_copy_only=False)
            outside = pc.replace_substring_regex(ql, _QUOTED_CELL, "")
            qcells = pc.count_substring(outside, ",").to_numpy() + 1
            kind[q[ok & (qcells == self.width)]] = FAST
        return kind

    def _guess(self, view: pa.Array, data: bytes, ends: np.ndarray) -> np.ndarray:
        """The cheap classification: every line FAST but those with a quote that is not part of
        well-formed quoted cells (EXACT). Right for nearly every block; pyarrow then confirms it
        (one row per FAST line, each with the header's width) or `_classify` takes over."""
        kind = np.full(len(view), FAST, dtype=np.int8)
        if data.find(b'"') >= 0:
            quotes = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 34)
            quoted = np.unique(np.searchsorted(ends, quotes, side="right"))
            ok = pc.match_substring_regex(view.take(pa.array(quoted)), _WELL_FORMED).to_numpy(zero_copy_only=False)
            kind[quoted[~ok]] = EXACT
        return kind

    def _block(self, lines: _Lines, n: int) -> tuple[Block, int]:
        """The records that start on the first n lines; and how many lines they took (more than
        n when the last record's quoted cell continues past them)."""
        offsets = np.concatenate(([0], lines.ends[:n]))
        data = bytes(memoryview(lines.buf)[: offsets[-1]])  # one copy, immutable: pyarrow keeps views of it
        view = pa.StringArray.from_buffers(n, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data))
        if self.exact_only:
            return self._walk(lines, np.full(n, EXACT, dtype=np.int8), data, offsets)  # type: ignore[return-value]
        done = self._walk(lines, self._guess(view, data, offsets[1:]), data, offsets)
        if done is None:  # a line with the wrong width, or only whitespace: look at every line
            done = self._walk(lines, self._classify(view), data, offsets)
            assert done is not None, "the fast CSV path disagreed with the line classification"
        return done

    def _walk(self, lines: _Lines, kind: np.ndarray, data: bytes,
              offsets: np.ndarray) -> tuple[Block, int] | None:
        """Read the block as classified: FAST lines in one pyarrow call, the others one by one.
        None when pyarrow did not make exactly one row of the header's width per FAST line."""
        n = len(kind)
        fast_runs: list[tuple[int, int]] = []
        exact_lines: list[int] = []
        exact_cells: list[list[str]] = []
        bad: list[tuple[int, list[str]]] = []
        spans: list[tuple[int, int]] = []
        i = 0
        for j in [*np.flatnonzero(kind != FAST).tolist(), n]:
            if j < i:
                continue  # a continuation line of a record read the exact way
            if j > i:
                fast_runs.append((i, j))
            i = j
            if j == n:
                break
            if kind[j] == BLANK:
                i = j + 1
                continue
            cells, used = _exact(lines, j, self.name)
            i = j + used
            if used > 1:  # one spreadsheet row over several lines
                spans.append((lines.first_line + j, used - 1))
            if is_blank(cells):
                continue
            line = lines.first_line + j
            if len(cells) == self.width:
                exact_lines.append(line)
                exact_cells.append(cells)
            elif len(cells) > self.width and is_blank(cells[self.width:]):
                exact_lines.append(line)
                exact_cells.append(cells[: self.width])
            else:
                bad.append((line, cells))

        fast_lines = (np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in fast_runs])
                      if fast_runs else np.zeros(0, dtype=np.int64)) + lines.first_line
        if len(fast_lines):
            whole = memoryview(data)
            chunk = (whole[offsets[fast_runs[0][0]]:offsets[fast_runs[0][1]]] if len(fast_runs) == 1
                     else b"".join(whole[offsets[a]:offsets[b]] for a, b in fast_runs))
            quoted = any(data.find(b'"', offsets[a], offsets[b]) >= 0 for a, b in fast_runs)
            longest = int(np.diff(offsets).max())
            columns = self._parse(chunk, len(fast_lines), longest, quoted)
            if columns is None:
                return None
        else:
            columns = [pa.chunked_array([], TEXT) for _ in range(self.width)]
        block = _merge(fast_lines, columns, exact_lines, exact_cells)
        block.bad = bad
        block.spans = spans
        return block, max(i, n)

    def _parse(self, data: bytes | memoryview, rows: int, longest: int, quoted: bool) -> list[pa.ChunkedArray] | None:
        """pyarrow's parser over FAST lines only; None unless it made exactly one row per line."""
        invalid_rows = 0

        def invalid(row) -> str:
            nonlocal invalid_rows
            invalid_rows += 1
            return "skip"

        names = [f"c{k}" for k in range(self.width)]
        table = pv.read_csv(
            pa.py_buffer(data),
            # 1 MiB blocks parse faster than one big one (cache); columns stay chunked, uncopied
            read_options=pv.ReadOptions(column_names=names, block_size=max(1 << 20, 2 * longest),
                                        use_threads=False),
            parse_options=pv.ParseOptions(quote_char='"' if quoted else False, double_quote=True,
                                          newlines_in_values=False, ignore_empty_lines=False,
                                          invalid_row_handler=invalid),
            convert_options=pv.ConvertOptions(column_types=dict.fromkeys(names, TEXT),
                                              null_values=[""], strings_can_be_null=True,
                                              quoted_strings_can_be_null=True),
        )
        if invalid_rows or table.num_rows != rows:
            return None
        return list(table.columns)

    # ---- reading one record again --------------------------------------------------------------
    def cell_at(self, line: int, column: int) -> str | None:
        """Cell `column` (trimmed, None when empty or missing) of the record that starts on
        `line`, read again from the file. Only lines already handed out in a block."""
        with self._lock:
            k = bisect.bisect_right(self._index_lines, line) - 1
            if k < 0:
                return None
            offset, first = self._index_offsets[k], self._index_lines[k]
        with self.path.open("rb") as f:
            lines = _Lines(f, offset=offset, first_line=first, read_size=MIN_READ)
            skip = line - first
            if not lines.fill(skip + 1):
                return None
            cells, _ = _exact(lines, skip, self.name)
        if column >= len(cells):
            return None
        cell = cells[column].strip()
        return (unsafe_cell(cell) if re.match(_PREFIXED, cell) else cell) or None


def _merge(fast_lines: np.ndarray, fast: list[pa.ChunkedArray], exact_lines: list[int],
           exact_cells: list[list[str]]) -> Block:
    """FAST and EXACT rows in file order, trimmed, without blank rows."""
    lines, columns = fast_lines, fast
    if exact_lines:
        extra = [pa.array([c[k] for c in exact_cells], TEXT) for k in range(len(fast))]
        lines = np.concatenate((lines, np.asarray(exact_lines, dtype=np.int64)))
        columns = [pa.chunked_array([*col.chunks, x], TEXT) for col, x in zip(columns, extra, strict=True)]
        if len(fast_lines):
            order = np.argsort(lines, kind="stable")
            lines = lines[order]
            idx = pa.array(order)
            columns = [col.take(idx) for col in columns]
    for k in range(len(columns)):  # in place, one column at a time: each original freed once done
        columns[k] = unprefix(trim_null(columns[k]))
    if len(lines):
        empty = np.ones(len(lines), dtype=bool)
        for col in columns:
            if col.null_count == 0:
                empty[:] = False
                break
            empty &= col.is_null().to_numpy(zero_copy_only=False)
        if empty.any():  # only commas and spaces, or empty quoted cells: a blank line
            keep = pa.array(~empty)
            lines = lines[~empty]
            columns = [col.filter(keep) for col in columns]
    return Block(lines=lines, columns=columns)
