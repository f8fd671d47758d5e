"""The one CSV writer (and its reader) for every CSV file labsync writes.

Program managers open these reports in Excel, and a cell that begins with `=`, `+`, `-`, `@`,
a tab or a carriage return runs there as a formula (CSV injection: `=HYPERLINK(...)` sends
data to a stranger, `=cmd|...` starts programs). OWASP's rule: put an apostrophe in front, so
the spreadsheet shows the text. A newline and the fullwidth forms of those characters, which
some Excel locales also read as a formula start, are treated the same.

The prefix must never lose or change a value, so a cell that already starts with an apostrophe
gets one too. Reading is then unambiguous: a cell that starts with `'` lost exactly its first
character to us (`unsafe_cell`). `read_rows` is that reader; every place that reads a file
labsync wrote uses it, and nothing else may parse these files.

Every file is written for Excel on Windows: UTF-8 with a BOM (without it Excel reads the bytes as
the local code page and garbles accents) and CRLF line ends. Readers use `utf-8-sig`, so a file
with or without the BOM reads the same. The fix-and-redrop file (FILE.fix.csv) comes back to us
as a batch, so the batch reader strips the prefix too (`unsafe_cell`): `+1` survives the trip.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

PREFIX = "'"
ENCODING = "utf-8-sig"  # writes a BOM; reads a file with or without one
LINE_END = "\r\n"
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n", "\uff1d", "\uff0b", "\uff0d", "\uff20")


def safe_cell(value: object) -> str:
    """The cell as written: text, with `'` in front when a spreadsheet could read a formula
    (or when it already starts with `'`, so the prefix can always be taken off again)."""
    text = "" if value is None else str(value)
    return PREFIX + text if text.startswith((*FORMULA_STARTS, PREFIX)) else text


def unsafe_cell(cell: str) -> str:
    """The value `safe_cell` was given."""
    return cell[len(PREFIX):] if cell.startswith(PREFIX) else cell


class SafeWriter:
    """csv.writer whose every cell goes through `safe_cell`."""

    def __init__(self, handle: IO[str]) -> None:
        self._writer = csv.writer(handle, lineterminator=LINE_END)

    def writerow(self, row: Iterable[object]) -> None:
        self._writer.writerow([safe_cell(v) for v in row])

    def writerows(self, rows: Iterable[Iterable[object]]) -> None:
        for row in rows:
            self.writerow(row)


def open_writer(handle: IO[str]) -> SafeWriter:
    """A formula-safe writer on a handle opened with `open_text` (BOM, CRLF)."""
    return SafeWriter(handle)


def open_text(path: Path) -> IO[str]:
    """A file opened for writing the way every labsync CSV is written (UTF-8 with BOM)."""
    return Path(path).open("w", encoding=ENCODING, newline="")


def write_rows(path: Path, header: Sequence[str], rows: Iterable[Iterable[object]], *,
               bom: bool = True) -> Path:
    """Write a whole file (to a temporary name, renamed at the end), with a UTF-8 BOM first so
    Excel on Windows reads accents right (`bom=False` only for machine readers that choke on it)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding=ENCODING if bom else "utf-8", newline="") as f:
        writer = SafeWriter(f)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def read_rows(path: Path) -> Iterator[dict[str, str]]:
    """The rows of a file labsync wrote, as dicts of the original values (prefixes removed)."""
    with Path(path).open(encoding=ENCODING, newline="") as f:
        reader = csv.reader(f)
        header = [unsafe_cell(c) for c in next(reader, [])]
        for row in reader:
            yield dict(zip(header, (unsafe_cell(c) for c in row), strict=False))
