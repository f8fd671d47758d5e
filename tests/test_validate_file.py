"""File-level behaviour of validation: line numbers, encodings, malformed rows, unusable files,
the CLI's exit codes and the warehouse records."""

from __future__ import annotations

import csv
import shutil

import pytest
import sqlalchemy as sa

from etl.cli import main
from etl.errors import UnusableInputError
from etl.intake import records
from etl.intake.validate import CsvValidation, validate_file
from etl.warehouse import batch_files, rejected_rows
from schemas.columns import REQUIRED
from tests.conftest import migrated
from tests.helpers import EXAMPLES, read_rejects, seed_row, write_csv


def rows_of(validation: CsvValidation) -> list[dict]:
    return [r for chunk in validation.chunks() for r in chunk]


def test_example_batch_is_valid_and_keeps_custom_columns():
    validation = CsvValidation(EXAMPLES / "orders.csv")
    valid = rows_of(validation)
    assert validation.result.total_rows == len(valid) == 10 and validation.result.rejects_path is None
    first = valid[0]
    assert first["line"] == 2 and first["client_order_id"] == "1234567"
    assert first["custom.SubscriberID"] == "12345678" and first["pcp_state"] is None


def test_blank_lines_skipped_and_line_numbers_are_file_lines(tmp_path):
    header = ",".join(seed_row().keys())
    good = ",".join(f'"{v}"' for v in seed_row(client_order_id="A", note="two\nlines").values())
    bad = ",".join(f'"{v}"' for v in seed_row(client_order_id="B", race="Purple").values())
    path = tmp_path / "b.csv"
    path.write_text(f"{header}\n\n{good}\n   \n{bad}\n\n", encoding="utf-8")
    validation = CsvValidation(path)
    valid = rows_of(validation)
    assert [(r["line"], r["client_order_id"], r["note"]) for r in valid] == [(3, "A", "two\nlines")]
    (reject,) = read_rejects(validation.result.rejects_path)
    assert (reject["line"], reject["client_order_id"], reject["column"]) == ("6", "B", "race")
    assert validation.result.total_rows == 2


def test_bom_and_surrounding_spaces(tmp_path):
    path = write_csv(tmp_path / "b.csv", [seed_row(first_name="  Ada  ", client_order_id=" X-1 ")], bom=True)
    text = path.read_text(encoding="utf-8-sig")
    path.write_text(text.replace("client_order_id,", " Client_Order_ID ,", 1), encoding="utf-8-sig")
    (row,) = rows_of(CsvValidation(path))
    assert (row["first_name"], row["client_order_id"]) == ("Ada", "X-1")


def test_only_required_columns_is_enough(tmp_path):
    row = {c: seed_row()[c] for c in REQUIRED}
    path = write_csv(tmp_path / "b.csv", [row], columns=list(REQUIRED))
    (valid,) = rows_of(CsvValidation(path))
    assert valid["email"] is None and valid["physician_npi"] is None


def test_duplicate_client_order_id_across_chunks_rejects_the_later_rows(tmp_path):
    rows = [seed_row(client_order_id=cid) for cid in ("A", "B", "C", "A", "D", "B")]
    validation = CsvValidation(write_csv(tmp_path / "b.csv", rows), chunk_rows=2)
    assert [r["client_order_id"] for r in rows_of(validation)] == ["A", "B", "C", "D"]
    rejects = read_rejects(validation.result.rejects_path)
    assert [(r["line"], r["client_order_id"]) for r in rejects] == [("5", "A"), ("7", "B")]
    assert "already appears on line 2" in rejects[0]["reason"]


def test_rows_with_the_wrong_number_of_cells_are_rejected_not_dropped(tmp_path):
    path = write_csv(tmp_path / "b.csv", [seed_row(client_order_id="A"), seed_row(client_order_id="B")])
    lines = path.read_text().splitlines()
    lines[2] = lines[2] + ",surprise"
    lines.append("C,only,three")
    path.write_text("\n".join(lines) + "\n")
    validation = CsvValidation(path)
    assert [r["client_order_id"] for r in rows_of(validation)] == ["A"]
    rejects = read_rejects(validation.result.rejects_path)
    assert [(r["line"], r["client_order_id"], r["column"]) for r in rejects] == [("3", "B", "(row)"), ("4", "C", "(row)")]
    assert validation.result.total_rows == 3 and validation.result.rejected_rows == 2


def test_a_clean_rerun_removes_a_stale_rejects_file(tmp_path):
    path = write_csv(tmp_path / "b.csv", [seed_row(race="Purple")])
    assert validate_file(path).rejects_path.exists()
    write_csv(path, [seed_row()])
    assert validate_file(path).rejects_path is None
    assert not (tmp_path / "b.rejects.csv").exists()


UNUSABLE = {
    "empty": (b"", "the file is empty"),
    "binary": (b"PK\x03\x04\x00\x00binary", "binary data"),
    "latin-1": ("client_order_id,first_name\n1,Zo\u00eb\n".encode("latin-1"), "not UTF-8"),
    "unknown column": (b"client_order_id,prgram_code\n1,2\n", "did you mean 'program_code'"),
    "missing required": (b"client_order_id,first_name\n1,Ada\n", "required column missing: program_code"),
    "duplicate header": (b"client_order_id,client_order_id\n1,2\n", "repeats client_order_id"),
    "semicolons": (b"client_order_id;program_code\n1;2\n", "comma-separated"),
    "blank only": (b"\n\n  \n", "no header"),
    "nameless column": (b"client_order_id,,program_code\n", "column 2 of the header has no name"),
}


@pytest.mark.parametrize("content,words", UNUSABLE.values(), ids=UNUSABLE.keys())
def test_unusable_files_exit_2_with_one_line_and_no_traceback(tmp_path, capsys, monkeypatch, content, words):
    monkeypatch.setenv("LABSYNC_WAREHOUSE_URL", migrated(f"sqlite:///{tmp_path / 'w.db'}"))
    path = tmp_path / "batch.csv"
    path.write_bytes(content)
    with pytest.raises(UnusableInputError, match=words.replace("(", r"\(")):
        CsvValidation(path)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_exit_codes_and_warehouse_records(engine, warehouse_url, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LABSYNC_WAREHOUSE_URL", warehouse_url)
    good = shutil.copy(EXAMPLES / "orders.csv", tmp_path / "good.csv")
    broken = shutil.copy(EXAMPLES / "orders_broken.csv", tmp_path / "broken.csv")
    assert main(["validate", str(good), "--record"]) == 0
    assert main(["validate", str(broken), "--record"]) == 1
    assert main(["validate", str(broken), "--record"]) == 1  # re-validating replaces, does not add
    renamed = shutil.copy(broken, tmp_path / "renamed.csv")
    assert main(["validate", str(renamed), "--record"]) == 1
    out = capsys.readouterr().out
    assert "good.csv: 10 rows, 10 valid, 0 rejected" in out
    assert "broken.csv: 8 rows, 2 valid, 6 rejected (13 problems" in out
    with engine.connect() as conn:
        batches = conn.execute(sa.select(batch_files.c.file_name, batch_files.c.status, batch_files.c.valid_rows,
                                         batch_files.c.rejected_rows).order_by(batch_files.c.id)).all()
        n_rejects = conn.execute(sa.select(sa.func.count()).select_from(rejected_rows)).scalar_one()
    assert batches == [("good.csv", "received", 10, 0), ("broken.csv", "received", 2, 6)]  # checked, not staged
    assert n_rejects == 13
    report = read_rejects(tmp_path / "broken.rejects.csv")
    stored = records.rejected(engine, records.find_batch(engine, CsvValidation(broken).sha256)["id"])
    assert [(int(r["line"]), r["column"], r["reason"]) for r in report] == [
        (r["line"], r["column_name"], r["reason"]) for r in stored
    ]


def test_validate_is_a_dry_check_unless_record(engine, warehouse_url, tmp_path, capsys, monkeypatch):
    """A file checked before it is dropped is not a batch yet: `labsync validate` records nothing
    in the warehouse (and sends nothing) unless --record is given."""
    monkeypatch.setenv("LABSYNC_WAREHOUSE_URL", warehouse_url)
    broken = shutil.copy(EXAMPLES / "orders_broken.csv", tmp_path / "checked-first.csv")
    assert main(["validate", str(broken)]) == 1
    assert "8 rows, 2 valid, 6 rejected" in capsys.readouterr().out
    assert (tmp_path / "checked-first.rejects.csv").exists()  # the report is still written beside it
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(batch_files)).scalar_one() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(rejected_rows)).scalar_one() == 0
    assert main(["validate", str(broken), "--record"]) == 1
    with engine.connect() as conn:
        assert conn.execute(sa.select(batch_files.c.file_name)).scalars().all() == ["checked-first.csv"]


def test_unusable_file_is_recorded_with_its_reason(engine, tmp_path):
    path = tmp_path / "b.csv"
    path.write_bytes(b"client_order_id,prgram_code\n1,2\n")
    with pytest.raises(UnusableInputError):
        records.open_batch(engine, path)
    with engine.connect() as conn:
        status, error = conn.execute(sa.select(batch_files.c.status, batch_files.c.error)).one()
    assert status == "unusable" and "prgram_code" in error


def test_rupa_patient_id_fills_missing_patient_fields_and_unknown_ids_are_rejected(tmp_path):
    known = {"pat_1": {"first_name": "Katherine", "last_name": "Johnson", "email": "kj@example.org", "dob": "1918-08-26"}}
    calls = []

    def lookup(ids):
        calls.append(ids)
        return {i: known[i] for i in ids if i in known}

    rows = [
        seed_row(client_order_id="A", first_name="", last_name="", email="", dob="", rupa_patient_id="pat_1"),
        seed_row(client_order_id="B", first_name="Given", rupa_patient_id="pat_1"),
        seed_row(client_order_id="C", rupa_patient_id="pat_404"),
    ]
    columns = [c for c in rows[0] if c not in ("first_name", "last_name", "email", "dob")] + ["first_name"]
    path = write_csv(tmp_path / "b.csv", rows, columns=columns)
    validation = CsvValidation(path, rupa_lookup=lookup)
    valid = {r["client_order_id"]: r for r in rows_of(validation)}
    assert (valid["A"]["first_name"], valid["A"]["dob"], valid["A"]["email"]) == ("Katherine", "1918-08-26", "kj@example.org")
    assert valid["B"]["first_name"] == "Given" and valid["B"]["last_name"] == "Johnson"
    (reject,) = read_rejects(validation.result.rejects_path)
    assert (reject["client_order_id"], reject["column"]) == ("C", "rupa_patient_id")
    assert "not among the Rupa patients" in reject["reason"]
    assert calls == [["pat_1", "pat_404"]]


def test_reject_report_has_the_documented_columns(tmp_path):
    validation = CsvValidation(write_csv(tmp_path / "b.csv", [seed_row(state="XX")]))
    rows_of(validation)
    with open(validation.result.rejects_path, encoding="utf-8-sig", newline="") as f:
        assert next(csv.reader(f)) == ["line", "row", "client_order_id", "column", "value", "reason"]


def test_validate_writes_the_same_reports_as_the_inbox(tmp_path, monkeypatch):
    """`labsync validate` and the inbox write the same files beside a batch, by the same code:
    the reject report and the fix-and-redrop file (the rejected rows, each with its problems)."""
    from etl.orders import inbox

    by_cli = tmp_path / "cli"
    by_cli.mkdir()
    shutil.copy(EXAMPLES / "orders_broken.csv", by_cli / "orders_broken.csv")
    assert main(["validate", str(by_cli / "orders_broken.csv")]) == 1

    box = tmp_path / "inbox"
    box.mkdir()
    shutil.copy(EXAMPLES / "orders_broken.csv", box / "orders_broken.csv")
    monkeypatch.setenv("LABSYNC_INBOX", str(box))
    monkeypatch.setenv("LABSYNC_WAREHOUSE_URL", migrated(f"sqlite:///{tmp_path / 'wh.db'}"))
    monkeypatch.setenv("LABSYNC_INBOX_SETTLE_SECONDS", "0")
    from etl import warehouse
    from etl.settings import Settings

    settings = Settings.from_env()
    inbox.prepare(warehouse.connect(settings.warehouse_url), settings, owner="cli:test")
    for report in ("orders_broken.rejects.csv", "orders_broken.fix.csv"):
        assert (by_cli / report).read_bytes() == (box / report).read_bytes(), report
    fixed = list(csv.DictReader((by_cli / "orders_broken.fix.csv").open(encoding="utf-8-sig")))
    assert fixed and all(row["problems"] for row in fixed)
