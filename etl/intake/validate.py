"""Validate an order-batch CSV against the contract, chunk by chunk, with a reject report.

    validation = CsvValidation(Path("orders.csv"))     # file-level checks; UnusableInputError
    for rows in validation.chunks():                    # valid rows of each chunk, as dicts
        ...
    validation.result                                   # counts, rejects file, sha256

What is checked where:
- the file (here, before any row goes on): readable, UTF-8 (BOM or not), no NUL bytes, a header
  with no unknown, duplicate or missing required columns. Any of these -> UnusableInputError.
- each row (here): the right number of cells, client_order_id unique within the file.
- each row (the pandera model in schemas.order_batch, run by etl.intake.checks): every rule
  of the LetsGetChecked document.

Rows are read by `etl.intake.reader`: pyarrow's parser for lines that are whole records, the
csv module from any line where a quoted cell may span lines, so `line` is the true line number in
the file (header = 1), blank lines are skipped and quoted cells may span lines. Memory is bounded
by `chunk_rows`, whatever the file's size: the duplicate-id check keeps 12 bytes an id
(`etl.intake.seen`), not the ids themselves.
The rejects file (`FILE.rejects.csv`: one line per problem, `line` the file's physical line and
`row` the row Excel shows) is written to a temporary name and renamed at the end; a file with no
problems leaves no rejects file (a stale one from an earlier run is removed). With `fix_path`,
the fix file (`FILE.fix.csv`) is written the same way: the rejected rows themselves, their
original columns and values, behind a first column `problems` that says what is wrong with each.
Fixed in Excel and dropped back, it is an ordinary batch: `problems` is read and ignored.
Both are written by etl.intake.csvsafe (UTF-8 with BOM, CRLF, formula-safe cells).
"""

from __future__ import annotations

import codecs
import csv
import difflib
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from etl.errors import UnusableInputError
from etl.intake import checks, csvsafe
from etl.intake.names import fix_path_for, rejects_path_for  # noqa: F401  (re-exported)
from etl.intake.reader import TEXT, Block, Reader
from etl.intake.seen import SeenIds
from etl.readahead import ReadAhead
from schemas.columns import (
    COLUMNS,
    CUSTOM_PREFIX,
    PHI,
    REQUIRED,
    RUPA_FILLABLE,
    RUPA_PATIENT_ID,
)
from schemas.contract import Contract
from schemas.order_batch import SCHEMA, reason_for
from schemas.vocab import CANONICAL

log = logging.getLogger(__name__)

REJECT_COLUMNS = ("line", "client_order_id", "column", "value", "reason")
MAX_CUSTOM_NAME = 100  # custom.<key> header names
UPPERCASE = ("state", "country", "pcp_state", "pcp_country")
PHONE_SEPARATORS = r"[\s\-.()]"
_ROW = "(row)"  # the `column` of a problem that concerns the whole row

# A callable that maps Rupa patient ids to {"first_name", "last_name", "email", "dob"} for the
# ids it knows (see etl.orders.enrich); rows whose id is unknown are rejected.
RupaLookup = Callable[[list[str]], dict[str, dict]]

# A contract's checks against the warehouse (e.g. unknown Rupa ids): the chunk's frame in,
# (line, column, value, reason) out for every cell that fails.
CrossCheck = Callable[[pd.DataFrame], list[tuple[int, str, str | None, str]]]

csv.field_size_limit(16 * 1024 * 1024)
_STR = pd.StringDtype("pyarrow", na_value=float("nan"))  # pandas 3's default "str" dtype
_CANONICAL = {name: (pa.array(list(m), TEXT), pa.array(list(m.values()), TEXT)) for name, m in CANONICAL.items()}


def _re2_class(chars: str) -> str:
    """A character class for RE2 (pyarrow's regex engine) holding exactly `chars`."""
    return "[" + "".join(f"\\x{{{ord(c):x}}}" for c in sorted(set(chars))) + "]"


# PHONE_SEPARATORS for pyarrow: Python's \s is every str.isspace() character, RE2's only ASCII
# ones, so the class spells them out (a no-break space in a phone number is still removed).
_PHONE_SEPARATORS_RE2 = _re2_class("".join(chr(i) for i in range(0x3001) if chr(i).isspace()) + "-.()")


@dataclass(frozen=True)
class Problem:
    line: int
    client_order_id: str | None
    column: str
    value: str | None
    reason: str

    def as_row(self, row: int | None = None) -> list:
        return [self.line, self.line if row is None else row, _shown(self.client_order_id, MAX_ID_SHOWN),
                self.column, _shown(self.value), self.reason]


MAX_SHOWN = 1000  # a longer value is a broken export: the report shows its start and its length
MAX_ID_SHOWN = 200  # the width of rejected_rows.client_order_id


def _shown(value: str | None, limit: int = MAX_SHOWN) -> str:
    if value is None:
        return ""
    if len(value) <= limit:
        return value
    return f"{value[:60]}… ({len(value)} characters in all)"


@dataclass
class ValidationResult:
    path: Path
    sha256: str
    total_rows: int = 0
    valid_rows: int = 0
    rejected_rows: int = 0
    problems: int = 0
    rejects_path: Path | None = None
    fix_path: Path | None = None
    # which columns hold PHI (the contract's Contract.is_phi): their rejected cells are not stored
    # in the warehouse (etl.intake.records). Unknown: every column is taken for PHI.
    is_phi: Callable[[str], bool] = field(default=lambda _column: True, repr=False, compare=False)

    @property
    def file_name(self) -> str:
        return self.path.name

    def summary(self) -> str:
        text = f"{self.file_name}: {self.total_rows} rows, {self.valid_rows} valid, {self.rejected_rows} rejected"
        if self.rejects_path:
            text += f" ({self.problems} problems, see {self.rejects_path}"
            text += f"; mend them in {self.fix_path} and drop it in the inbox)" if self.fix_path else ")"
        return text


def _normalise_order_batch(arrays: dict[str, pa.Array], n: int) -> dict[str, pa.Array]:
    """Case-agnostic vocabularies to their canonical spelling, codes upper-cased, phone
    separators removed: on the chunk's Arrow arrays, before pandas wraps them."""
    for name, (keys, values) in _CANONICAL.items():
        arr = arrays[name]
        if arr.null_count < n:
            mapped = pc.take(values, pc.index_in(pc.utf8_lower(arr), value_set=keys))
            arrays[name] = pc.coalesce(mapped, arr)
    for name in UPPERCASE:
        if arrays[name].null_count < n:
            arrays[name] = pc.utf8_upper(arrays[name])
    arrays["phone_number"] = pc.replace_substring_regex(arrays["phone_number"], _PHONE_SEPARATORS_RE2, "")
    return arrays


PROBLEMS = "problems"  # the first column of FILE.fix.csv

ORDER_BATCH = Contract(
    name="order batch", columns=COLUMNS, required=REQUIRED, schema=SCHEMA, reason_for=reason_for,
    id_column="client_order_id", extra_prefix=CUSTOM_PREFIX, template="examples/template.csv",
    row_noun="order", extra_columns=(RUPA_PATIENT_ID,), relaxed_by=(RUPA_PATIENT_ID, RUPA_FILLABLE),
    normalise_arrays=_normalise_order_batch, example="examples/orders.csv", ignored_columns=(PROBLEMS,),
    phi=PHI,
)
SEPARATORS = {";": "';' (semicolons)", "\t": "tabs", "|": "'|'"}


def _scan(path: Path, sha256: str | None = None) -> str:
    """sha256 of the bytes (unless the caller already hashed them: the file is hashed once),
    and the whole-file checks that must pass before any row goes on."""
    try:
        size = path.stat().st_size
        handle = path.open("rb")
    except FileNotFoundError:
        raise UnusableInputError(f"{path.name}: no such file") from None
    except IsADirectoryError:
        raise UnusableInputError(f"{path.name}: is a directory, not a CSV file") from None
    except OSError as exc:
        raise UnusableInputError(f"{path.name}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if size == 0:
        raise UnusableInputError(f"{path.name}: the file is empty")
    digest = hashlib.sha256() if sha256 is None else None
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with handle:
        while block := handle.read(1 << 20):
            if digest is not None:
                digest.update(block)
            if b"\x00" in block:
                raise UnusableInputError(f"{path.name}: contains binary data; save it as CSV (UTF-8) and try again")
            try:
                # plain ASCII is valid UTF-8: skip building a str of it (unless a character
                # begun in the previous block is still open)
                if not (block.isascii() and not decoder.getstate()[0]):
                    decoder.decode(block)
            except UnicodeDecodeError as exc:
                raise UnusableInputError(
                    f"{path.name}: is not UTF-8 text (bad byte at position {offset + exc.start}); "
                    "save it as 'CSV UTF-8' and try again"
                ) from None
            offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UnusableInputError(f"{path.name}: is not UTF-8 text (it ends mid-character)") from None
    if digest is not None:
        return digest.hexdigest()
    assert sha256 is not None  # digest is None only when the caller gave the hash
    return sha256


MAX_NAMED = 5  # unknown columns named in a reason; the rest are counted
MAX_NAME_SHOWN = 40


def _some(names: list[str], hints: dict[str, str] | None = None, *, quote: bool = True) -> str:
    """`'a', 'b' (did you mean 'c'?) and 9,995 more`: a bounded list for a one-line reason."""
    shown = []
    for n in names[:MAX_NAMED]:
        text = n if len(n) <= MAX_NAME_SHOWN else n[: MAX_NAME_SHOWN - 1] + "…"
        text = repr(text) if quote else text
        shown.append(text + (f" (did you mean {hints[n]!r}?)" if hints and n in hints else ""))
    rest = len(names) - len(shown)
    return ", ".join(shown) + (f" and {rest:,} more" if rest else "")


def _other_separator(raw: list[str], contract: Contract) -> str | None:
    """The separator a header uses when it is not a comma (European Excel saves CSV with `;`):
    the one that splits the header into column names of the contract."""
    known = set(contract.columns) | set(contract.extra_columns)
    line = ",".join(raw)
    for sep in SEPARATORS:
        if sep in line and any(c.strip().lower() in known for c in line.split(sep)):
            return sep
    if len(raw) == 1:  # one column: some other separator, names we do not know
        return next((sep for sep in SEPARATORS if sep in raw[0]), None)
    return None


def _canonical_header(raw: list[str], file_name: str, contract: Contract = ORDER_BATCH) -> list[str]:
    prefix = contract.extra_prefix
    known = set(contract.columns) | set(contract.extra_columns)
    ignored = set(contract.ignored_columns)
    if not any(c.strip().lower() in known or contract.is_extra(c.strip()) for c in raw):
        # a data row where the header should be: say so without echoing its cells (PHI)
        sep = _other_separator(raw, contract)
        if sep is not None:
            example = f"; {contract.example} shows the layout" if contract.example else ""
            raise UnusableInputError(
                f"{file_name}: the columns are separated by {SEPARATORS[sep]} but labsync reads "
                "comma-separated files (Excel saves CSV with ';' in some countries); in Excel use "
                f"File > Save As > 'CSV UTF-8 (comma delimited)' and drop the file again{example}"
            )
        raise UnusableInputError(
            f"{file_name}: has no header line (line 1 holds none of the column names of "
            f"{contract.template}); add the header as the first line"
        )
    names: list[str] = []
    for i, cell in enumerate(raw, start=1):
        name = cell.strip()
        if not name:
            raise UnusableInputError(f"{file_name}: column {i} of the header has no name")
        if name.lower().startswith(prefix):
            name = prefix + name[len(prefix):].strip()
        else:
            name = name.lower()
        names.append(name)
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    dupes = sorted(n for n, c in counts.items() if c > 1)
    if dupes:
        raise UnusableInputError(f"{file_name}: the header repeats {_some(dupes, quote=False)}")
    unknown = [n for n in names if n not in known and n not in ignored and not contract.is_extra(n)]
    if unknown:
        if contract is ORDER_BATCH and {"row_id", "return_url"} <= set(names):
            raise UnusableInputError(f"{file_name}: this is a Rupa order-intents file (row_id, return_url); "
                                     "drop it into the inbox's intents/ folder or run `labsync intents FILE`")
        hints = {}
        for n in unknown[:MAX_NAMED]:
            guess = difflib.get_close_matches(n[:100], sorted(known), n=1, cutoff=0.75)
            if guess:
                hints[n] = guess[0]
        raise UnusableInputError(
            f"{file_name}: unknown column {_some(unknown, hints)}; use the columns of "
            f"{contract.template}, or {prefix}<key> for {'custom' if contract is ORDER_BATCH else 'your own'} data"
        )
    too_long = [n for n in names if contract.is_extra(n) and len(n) > MAX_CUSTOM_NAME]
    if too_long:
        raise UnusableInputError(f"{file_name}: the {prefix}<key> column name {_some(too_long)} is longer "
                                 f"than {MAX_CUSTOM_NAME} characters")
    required = set(contract.required)
    if contract.relaxed_by and contract.relaxed_by[0] in names:
        required -= set(contract.relaxed_by[1])
    missing = [c for c in contract.required if c in required and c not in names]
    if missing:
        raise UnusableInputError(f"{file_name}: required column missing: {', '.join(missing)}")
    return names


class CsvValidation:
    """One pass over one file. Construct (file-level checks), iterate `chunks()`, read `result`."""

    def __init__(
        self,
        path: Path | str,
        *,
        chunk_rows: int = 20_000,
        rejects_path: Path | None = None,
        fix_path: Path | None = None,
        rupa_lookup: RupaLookup | None = None,
        contract: Contract = ORDER_BATCH,
        cross_check: CrossCheck | None = None,
        sha256: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.chunk_rows = chunk_rows
        self.rupa_lookup = rupa_lookup
        self.contract = contract
        self.cross_check = cross_check
        sha = _scan(self.path, sha256)  # `sha256`: the caller hashed these very bytes already
        self.result = ValidationResult(path=self.path, sha256=sha, is_phi=contract.is_phi)
        self._rejects_final = rejects_path or rejects_path_for(self.path)
        self._fix_final = fix_path  # None: no fix file (`labsync validate`, intents)
        try:
            self.header = self._read_header()
        except UnusableInputError as exc:
            exc.sha256 = sha  # lets the caller remember the unusable file by its content
            raise
        self._reader = Reader(self.path, len(self.header), target_rows=chunk_rows)
        id_pos = self.header.index(self.contract.id_column)
        self._seen_ids = SeenIds(lambda line: self._reader.cell_at(line, id_pos))

    @property
    def sha256(self) -> str:
        return self.result.sha256

    # ---- reading -------------------------------------------------------------------------
    def _open(self):
        return self.path.open("r", encoding="utf-8-sig", newline="")

    def _read_header(self) -> list[str]:
        with self._open() as f:
            for raw in csv.reader(f):
                if any(cell.strip() for cell in raw):
                    names = _canonical_header(raw, self.path.name, self.contract)
                    self.raw_header = [c.strip() for c in raw]  # the fix file's header, as written
                    return names
        raise UnusableInputError(f"{self.path.name}: has no header line")

    # ---- validating ----------------------------------------------------------------------
    def chunks(self) -> Iterator[list[dict]]:
        """Validate chunk by chunk; yield each chunk's valid rows as dicts; write the rejects file."""
        for frame in self.frames():
            yield self._as_dicts(frame)

    def frames(self) -> Iterator[pd.DataFrame]:
        """Like chunks(), but each chunk's valid rows as a DataFrame indexed by line number."""
        return self._frames(keep=True)

    def _frames(self, *, keep: bool) -> Iterator[pd.DataFrame]:
        """frames(); with keep=False the valid rows are counted but not copied out (run())."""
        tmp = self._rejects_final.with_name(self._rejects_final.name + ".tmp")
        fix_tmp = self._fix_final.with_name(self._fix_final.name + ".tmp") if self._fix_final else None
        writer_file = fix_file = None
        writer = fix_writer = None
        # the next block is read (pyarrow, NumPy: the GIL released) while this one is checked
        blocks = ReadAhead(self._reader.blocks(), name="labsync-csv-blocks")
        try:
            for block in blocks:
                valid, problems = self._check(block, keep=keep)
                if problems:
                    if writer is None:
                        writer_file = csvsafe.open_text(tmp)  # BOM, CRLF, formula-safe cells
                        writer = csvsafe.open_writer(writer_file)
                        writer.writerow(self.contract.reject_columns)
                    rows = self._reader.row_of([p.line for p in problems]).tolist()
                    writer.writerows(p.as_row(r) for p, r in zip(problems, rows, strict=True))
                    if fix_tmp is not None:
                        if fix_writer is None:
                            fix_file = csvsafe.open_text(fix_tmp)
                            fix_writer = csvsafe.open_writer(fix_file)
                            fix_writer.writerow(self._fix_header())
                        fix_writer.writerows(self._fix_rows(block, problems, dict(zip(
                            (p.line for p in problems), rows, strict=True))))
                self.result.total_rows += block.records
                rejected = len({p.line for p in problems})
                self.result.valid_rows += len(block.lines) - (rejected - len(block.bad))
                self.result.rejected_rows += rejected
                self.result.problems += len(problems)
                log.debug("%s: checked %d rows so far", self.path.name, self.result.total_rows)
                if len(valid):
                    yield valid
                del block, valid, problems  # not kept alive while the next block is taken
            if writer_file is not None:
                writer_file.close()
                writer_file = None
                os.replace(tmp, self._rejects_final)
                self.result.rejects_path = self._rejects_final
            elif self._rejects_final.exists():
                self._rejects_final.unlink()  # stale report from an earlier run of this file
            if fix_file is not None and fix_tmp is not None and self._fix_final is not None:
                fix_file.close()
                fix_file = None
                os.replace(fix_tmp, self._fix_final)
                self.result.fix_path = self._fix_final
            elif self._fix_final is not None and self._fix_final.exists():
                self._fix_final.unlink()
        finally:
            blocks.close()
            for handle in (writer_file, fix_file):
                if handle is not None:
                    handle.close()

    def _fix_header(self) -> list[str]:
        """`problems`, then the file's own header (a `problems` column of its own is dropped:
        it described an earlier round)."""
        return [PROBLEMS, *(raw for raw, name in zip(self.raw_header, self.header, strict=True)
                            if name not in self.contract.ignored_columns)]

    def _fix_rows(self, block: Block, problems: list[Problem], rows: dict[int, int]) -> Iterator[list]:
        """The block's rejected records as read (trimmed, labsync's formula prefix removed, not
        normalised), each behind the sentence of all its problems, in file order."""
        keep = [k for k, name in enumerate(self.header) if name not in self.contract.ignored_columns]
        reasons: dict[int, list[str]] = {}
        for p in problems:
            reasons.setdefault(p.line, []).append(p.reason)
        raw = dict(block.bad)
        lines = sorted(reasons)
        good = [ln for ln in lines if ln not in raw]
        cells: dict[int, list] = {}
        if good:
            at = pa.array(np.searchsorted(block.lines, good))
            cols = [block.columns[k].take(at).to_pylist() for k in keep]
            cells = {ln: [c[i] for c in cols] for i, ln in enumerate(good)}
        for ln in lines:
            values = cells.get(ln)
            if values is None:  # the wrong number of cells: written as they are, to be fixed
                values = [c.strip() for c in raw[ln]]
            yield [f"row {rows[ln]}: " + "; ".join(reasons[ln]), *values]

    def run(self) -> ValidationResult:
        """Validate the whole file without handing rows on; return the counts."""
        for _ in self._frames(keep=False):
            pass
        return self.result

    def _check(self, block: Block, *, keep: bool = True) -> tuple[pd.DataFrame, list[Problem]]:
        width = len(self.header)
        id_pos = self.header.index(self.contract.id_column)
        problems: list[Problem] = []
        for line, cells in block.bad:
            cid = cells[id_pos].strip() if len(cells) > id_pos else None
            problems.append(Problem(line, cid or None, _ROW, None,
                f"line has {len(cells)} values but the header has {width} columns; "
                "check for a missing or extra comma, or an unclosed quote"))
        if not len(block.lines):
            return pd.DataFrame(), problems
        frame = self._frame(block)
        rupa_problems = self._enrich(frame)
        unknown_rupa = {p.line for p in rupa_problems}
        problems.extend(rupa_problems)
        if self.cross_check is not None:
            ids = frame[self.contract.id_column]
            problems.extend(Problem(line, None if pd.isna(ids.get(line)) else ids.get(line), column, value, reason)
                            for line, column, value, reason in self.cross_check(frame))
        problems.extend(
            p for p in self._schema_problems(frame, self._raw_lookup(block))
            # an unknown rupa_patient_id is the one cause of its row's empty patient fields
            if not (p.line in unknown_rupa and p.column in RUPA_FILLABLE and p.value is None)
        )
        problems.extend(self._duplicate_ids(frame))
        problems.sort(key=lambda p: p.line)
        if not problems or not keep:
            return frame if keep else pd.DataFrame(), problems
        bad = np.fromiter({p.line for p in problems}, dtype=np.int64)
        return frame[~np.isin(block.lines, bad)], problems

    def _raw_lookup(self, block: Block) -> Callable[[int, str], str | None]:
        """(line, column) -> the cell as the file has it (trimmed, not normalised): reasons and
        hints describe what the person typed (`555.0100` or `1.23E+11`, not `5550100`)."""
        position = {name: k for k, name in enumerate(self.header)}

        def raw(line: int, column: str) -> str | None:
            k = position.get(column)
            if k is None:
                return None
            i = int(np.searchsorted(block.lines, line))
            if i >= len(block.lines) or block.lines[i] != line:
                return None
            return block.columns[k][i].as_py()

        return raw

    def _frame(self, block: Block) -> pd.DataFrame:
        """The chunk as Arrow-backed strings (trimmed, empty -> missing), normalised.

        The reader hands over one Arrow array per column; normalising happens on those arrays
        and pandas wraps them without copying the text."""
        n = len(block.lines)
        index = pd.Index(block.lines, name="line")
        arrays = {name: col for name, col in zip(self.header, block.columns, strict=True)
                  if name not in self.contract.ignored_columns}
        for name in self.contract.columns:
            if name not in arrays:
                arrays[name] = pa.nulls(n, TEXT)
        if self.contract.normalise_arrays is not None:
            arrays = self.contract.normalise_arrays(arrays, n)
        frame = pd.DataFrame({name: pd.Series(pd.array(arr, dtype=_STR), index=index, copy=False)
                              for name, arr in arrays.items()}, index=index, copy=False)
        return self.contract.normalise(frame) if self.contract.normalise is not None else frame

    def _enrich(self, frame: pd.DataFrame) -> list[Problem]:
        """Fill missing patient columns from the warehouse's Rupa copy (rupa_patient_id)."""
        if self.contract.relaxed_by is None or RUPA_PATIENT_ID not in frame.columns:
            return []
        ids = frame[RUPA_PATIENT_ID].dropna()
        if ids.empty:
            return []
        known = self.rupa_lookup(sorted(set(ids))) if self.rupa_lookup else {}
        problems = []
        for line, rid in ids.items():
            patient = known.get(rid)
            if patient is None:
                reason = (
                    f"rupa_patient_id {rid!r} is not among the Rupa patients in the warehouse; "
                    "check the id or run `labsync extract patients`"
                    if self.rupa_lookup
                    else "rupa_patient_id cannot be checked: no warehouse with Rupa patients was given"
                )
                cid = frame.at[line, self.contract.id_column]
                problems.append(Problem(line, None if pd.isna(cid) else cid, RUPA_PATIENT_ID, rid, reason))
                continue
            for col in RUPA_FILLABLE:
                if pd.isna(frame.at[line, col]) and patient.get(col):
                    frame.at[line, col] = patient[col]
        return problems

    def _schema_problems(self, frame: pd.DataFrame,
                         raw_at: Callable[[int, str], str | None] | None = None) -> list[Problem]:
        problems: dict[tuple[int, str, str], Problem] = {}
        ids = frame[self.contract.id_column]
        for line, column, check in checks.failures(self.contract.schema, frame):
            if line is None:
                log.warning("%s: a check failed without a row (%s)", self.path.name, check)
                continue
            line = int(line)
            if check.startswith("requires:"):
                column = check.split(":", 1)[1]
            elif check == "pcp_full_name":
                column = "pcp_first_name"
            if column is None:  # schemas/contract.py: a dataframe check is reported against a column
                raise ValueError(f"check {check}: a dataframe check must be named requires:<column> "
                                 "or pcp_full_name")
            key = (line, column, check)
            if key in problems:
                continue
            value: str | None  # the cell as the file has it, for the reason
            shown: str | None  # the reject report's `value`
            if check == "pcp_full_name":
                from schemas.order_batch import _pcp_full_name_length

                value = str(int(_pcp_full_name_length(frame.loc[[line]]).iloc[0]))
                shown = None
            else:
                raw = raw_at(line, column) if raw_at is not None else None
                if raw is None:  # not in the file (e.g. filled from the warehouse's Rupa copy)
                    raw = frame.at[line, column] if column in frame.columns else None
                value = shown = None if raw is None or pd.isna(raw) else str(raw)
            cid = ids.get(line)
            problems[key] = Problem(line, None if pd.isna(cid) else cid, column, shown,
                                    self.contract.reason_for(check, column, value))
        return list(problems.values())

    def _duplicate_ids(self, frame: pd.DataFrame) -> list[Problem]:
        col = self.contract.id_column
        ids = frame[col].to_numpy(dtype=object, na_value=None)
        return [Problem(line, cid, col, cid,
                        f"{col} {cid!r} already appears on line {first}; each {self.contract.row_noun} needs its own id")
                for line, cid, first in self._seen_ids.check(frame.index.to_numpy(), ids)]

    @staticmethod
    def _as_dicts(frame: pd.DataFrame) -> list[dict]:
        if frame.empty:
            return []
        keys = ["line", *frame.columns]
        cols = [frame.index.tolist()] + [pa.array(frame[c]).to_pylist() for c in frame.columns]
        return [dict(zip(keys, vals, strict=True)) for vals in zip(*cols, strict=True)]


def validate_file(path: Path | str, **kw) -> ValidationResult:
    """Validate a whole file (draining the valid rows); return the counts."""
    return CsvValidation(path, **kw).run()
