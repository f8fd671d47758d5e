"""The fast CSV reader gives exactly what reading every line the exact way gives (rows, cells,
line numbers, bad rows), and the duplicate-id check stays exact in compact memory."""

from __future__ import annotations

import csv
import io
import random
from itertools import chain
from pathlib import Path

import numpy as np
import pytest

from etl.intake.reader import Reader
from etl.intake.seen import SeenIds
from etl.intake.validate import CsvValidation
from tests.helpers import read_rejects, seed_row

COLUMNS = list(seed_row())
WIDTH = len(COLUMNS)


def reference(path: Path) -> tuple[list[tuple[int, list[str | None]]], list[tuple[int, list[str]]]]:
    """Records the way labsync always read them, written independently: Python's text file
    (universal newlines), a comma split for lines without a quote, csv.reader from a line with
    one (consuming continuation lines), blank records skipped, the first one the header."""
    rows, bad = [], []
    with path.open(encoding="utf-8-sig", newline="") as f:
        number = 0

        def numbered():
            nonlocal number
            for raw in f:
                number += 1
                yield raw

        lines = numbered()
        header = False
        for raw in lines:
            start = number
            cells = next(csv.reader(chain((raw,), lines)), []) if '"' in raw else raw.rstrip("\r\n").split(",")
            if not "".join(cells).strip():
                continue
            if not header:
                header = True
                continue
            if len(cells) == WIDTH or (len(cells) > WIDTH and not "".join(cells[WIDTH:]).strip()):
                rows.append((start, [c.strip() or None for c in cells[:WIDTH]]))
            else:
                bad.append((start, cells))
    return rows, bad


def read_all(path: Path, target_rows: int, **kw) -> tuple[list, list]:
    rows, bad = [], []
    for block in Reader(path, WIDTH, target_rows=target_rows, **kw).blocks():
        assert len(block.lines) <= target_rows
        cols = [c.to_pylist() for c in block.columns]
        rows.extend((int(line), [col[i] for col in cols]) for i, line in enumerate(block.lines))
        bad.extend(block.bad)
    return rows, bad


def csv_line(row: dict, *, quote_all: bool = False) -> str:
    buf = io.StringIO()
    csv.writer(buf, quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL, lineterminator="").writerow(
        row[c] for c in COLUMNS)
    return buf.getvalue()


def mixed_file(path: Path, newline: str = "\n") -> Path:
    """Long quote-free stretches broken by every kind of line the fast path must not take."""
    lines = [",".join(COLUMNS)]
    for i in range(300):
        row = seed_row(client_order_id=f"M-{i}")
        if i % 37 == 5:
            row["note"] = "first line\nsecond line, with a comma"  # a cell spanning lines
        if i % 41 == 9:
            row["note"] = 'she said "hi",\r\nthen left'  # CRLF inside a quoted cell
        if i % 29 == 3:
            row["address_line2"] = "Apt 4, Floor 2"  # well-formed quoted cell
        text = csv_line(row, quote_all=i % 53 == 11)
        if i % 43 == 7:
            text = text.replace("Boston", 'Bos"ton', 1)  # a stray quote: literal in csv
        if i % 31 == 13:
            text += ",,"  # Excel's trailing empty cells
        if i % 47 == 17:
            text = text.rsplit(",", 3)[0]  # too few cells
        if i % 59 == 19:
            text += ",surprise"  # too many cells
        lines.append(text)
        if i % 23 == 0:
            lines.append(["", "   ", "," * (WIDTH - 1), " , ,\u2003", "," * (WIDTH + 2)][i % 5])
    path.write_text(newline.join(lines) + newline, encoding="utf-8", newline="")
    return path


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("target_rows", [1, 7, 50, 20_000])
def test_a_mixed_file_reads_exactly_as_the_exact_reader(tmp_path, newline, target_rows):
    path = mixed_file(tmp_path / "mixed.csv", newline)
    expected = reference(path)
    assert len(expected[0]) > 250 and expected[1]  # the file really has rows and bad rows
    assert read_all(path, target_rows) == expected
    assert read_all(path, target_rows, exact_only=True) == expected


def test_random_files_read_exactly_as_the_exact_reader(tmp_path):
    rnd = random.Random(14)
    pieces = ['"a, b"', '"x""y"', '""', '"two\nlines"', '"cr\r\nlf"', 'st"ray', ' "sp"', "\u00a0v ", "", "w"]
    for trial in range(40):
        lines = [",".join(COLUMNS)]
        for _ in range(rnd.choice([0, 1, 5, 60])):
            width = WIDTH + rnd.choice([0, 0, 0, 0, -1, 1, 3])
            cells = [rnd.choice(pieces) if rnd.random() < 0.15 else f"v{rnd.randrange(99)}" for _ in range(width)]
            lines.append(rnd.choice([",".join(cells), "", "  ", ","]))
        newline = rnd.choice(["\n", "\r\n", "\r"])
        data = ("\ufeff" if rnd.random() < 0.3 else "") + newline.join(lines) + (newline if rnd.random() < 0.7 else "")
        path = tmp_path / f"r{trial}.csv"
        path.write_text(data, encoding="utf-8", newline="")
        assert read_all(path, rnd.choice([1, 3, 1000])) == reference(path), data


def test_validation_gives_the_same_rows_and_problems_as_exact_reading(tmp_path):
    path = mixed_file(tmp_path / "mixed.csv")
    runs = []
    for exact in (False, True):
        validation = CsvValidation(path, chunk_rows=40)
        validation._reader.exact_only = exact
        rows = [r for chunk in validation.chunks() for r in chunk]
        runs.append((rows, read_rejects(validation.result.rejects_path), validation.result.total_rows))
        validation.result.rejects_path.unlink()
    assert runs[0] == runs[1]
    rows, rejects, total = runs[0]
    assert any("\n" in (r["note"] or "") for r in rows)  # multi-line cells arrived whole
    assert {r["column"] for r in rejects} >= {"(row)"}


def test_a_duplicate_id_after_100k_rows_is_caught_with_its_first_line(tmp_path):
    base = seed_row()
    template = csv_line(dict(base, client_order_id="{cid}")).replace("{", "{{").replace("}", "}}")
    template = template.replace("{{cid}}", "{cid}")
    path = tmp_path / "big.csv"
    with path.open("w", encoding="utf-8") as f:
        f.write(",".join(COLUMNS) + "\n")
        for i in range(100_000):
            f.write(template.format(cid=f"ID-{i:06d}") + "\n")
        f.write(template.format(cid="ID-000000") + "\n")  # line 100,002 repeats line 2
        f.write(template.format(cid="ID-054321") + "\n")  # line 100,003 repeats line 54,323
    validation = CsvValidation(path)
    result = validation.run()
    rejects = read_rejects(result.rejects_path)
    assert [(r["line"], r["client_order_id"]) for r in rejects] == [("100002", "ID-000000"), ("100003", "ID-054321")]
    assert "already appears on line 2;" in rejects[0]["reason"]
    assert "already appears on line 54323;" in rejects[1]["reason"]
    assert (result.total_rows, result.valid_rows) == (100_002, 100_000)
    assert validation._seen_ids.nbytes == 12 * 100_000  # 8-byte hash + 4-byte line an id


def test_ids_sharing_a_hash_are_told_apart_by_reading_the_file_again():
    ids_by_line = {2: "A", 3: "B", 4: "A", 5: "C", 6: "B", 7: "C", 8: "D"}
    reread = []

    def id_at(line):
        reread.append(line)
        return ids_by_line[line]

    seen = SeenIds(id_at, hash_fn=lambda ids: np.zeros(len(ids), dtype=np.uint64))  # all collide
    repeats = []
    for chunk in ([2, 3], [4, 5], [6, 7, 8]):
        ids = np.array([ids_by_line[n] for n in chunk], dtype=object)
        repeats += seen.check(np.array(chunk), ids)
    assert repeats == [(4, "A", 2), (6, "B", 3), (7, "C", 5)]
    assert set(reread) == {2}  # only the line the shared hash points at had to be read again


def test_repeats_over_many_chunks_are_all_found_whatever_the_merges_of_the_runs():
    """60 chunks of ids drawn from a small pool, with a weak hash (many shared hashes): every
    repeat is reported with the line the id first appeared on, as a dict of every id would say."""
    rng = np.random.default_rng(7)
    ids_by_line: dict[int, str] = {}
    seen = SeenIds(lambda line: ids_by_line[line],
                   hash_fn=lambda ids: np.array([hash(i) % 97 for i in ids], dtype=np.uint64))
    first: dict[str, int] = {}
    expected, got = [], []
    line = 2
    for _ in range(60):
        chunk = list(range(line, line + int(rng.integers(1, 40))))
        line = chunk[-1] + 1
        for n in chunk:
            ids_by_line[n] = f"ID{int(rng.integers(0, 400))}"
            cid = ids_by_line[n]
            if cid in first:
                expected.append((n, cid, first[cid]))
            else:
                first[cid] = n
        got += seen.check(np.array(chunk), np.array([ids_by_line[n] for n in chunk], dtype=object))
    assert got == expected and len(expected) > 100


def test_missing_ids_are_not_duplicates():
    seen = SeenIds(lambda line: None)
    assert seen.check(np.array([2, 3, 4]), np.array([None, float("nan"), "X"], dtype=object)) == []
    assert seen.check(np.array([5]), np.array([None], dtype=object)) == []


def test_a_record_is_read_again_by_its_line(tmp_path):
    path = mixed_file(tmp_path / "mixed.csv", "\r\n")
    reader = Reader(path, WIDTH, target_rows=10)
    rows = [(int(line), block.columns[0][i].as_py()) for block in reader.blocks()
            for i, line in enumerate(block.lines)]
    for line, cid in rows[::17]:
        assert reader.cell_at(line, 0) == cid
    note = COLUMNS.index("note")
    spanning = next(line for line, cid in rows if cid == "M-5")  # its note spans two lines
    assert reader.cell_at(spanning, note) == "first line\nsecond line, with a comma"


def test_phone_separators_include_every_unicode_space(tmp_path):
    """Python's \\s (what the phone clean-up always used) is every str.isspace() character; the
    Arrow regex engine's is ASCII only, so the class is spelled out: a no-break space or an
    em space between digits is still removed."""
    spaces = [chr(i) for i in range(0x3001) if chr(i).isspace() and chr(i) not in "\r\n"]
    rows = [seed_row(client_order_id=f"S{i}", phone_number=f"555{c}123{c}4567") for i, c in enumerate(spaces)]
    path = tmp_path / "phones.csv"
    path.write_text("\n".join([",".join(COLUMNS), *(csv_line(r) for r in rows)]) + "\n", encoding="utf-8")
    valid = [r for chunk in CsvValidation(path).chunks() for r in chunk]
    assert [r["phone_number"] for r in valid] == ["5551234567"] * len(spaces)
