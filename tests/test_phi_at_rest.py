"""Issue 23, points 1 and 2: the warehouse keeps no more PHI than it needs, and no error carries
PHI. The columns that hold PHI are declared once, in the contract (schemas.columns.PHI,
schemas.order_intents.PHI). A rejected cell of such a column stays in the reports beside the
batch (the rejects report, the fix file) and nowhere in the warehouse, and no reason quotes it; a
settled order's body leaves the outbox; the embedded SQLite warehouse and its -wal/-shm/-journal
are private to their owner (0600); and a write the database refuses (a rejected row, a result
value) fails that one item with the error's class and a plain reason: no value reaches a log, an
exception, the CLI's output, and the run goes on.

Planted values are distinctive strings, searched for in the warehouse's raw bytes (SQLite: the
database file and its -wal/-shm, wherever a page of it lies) and in every text column
(PostgreSQL)."""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import stat
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa

from etl import warehouse
from etl.intake.csvsafe import read_rows
from etl.warehouse import batch_files, lgc_outbox, rejected_rows
from schemas import order_batch, order_intents
from schemas.columns import PHI, is_phi
from tests.helpers import seed_row, write_csv
from tests.lifecycle_support import lgc, place_orders, quick, run
from tests.test_lgc_support import fast, order_row, outbox_rows

__all__ = ["run"]  # the in-process CLI fixture

# (column, a value that breaks its rule): each makes its row rejected for that PHI column
PLANTED = {
    "dob": "1985-02-30",  # not a real date
    "phone_number": "555Q019876",  # not digits
    "postal_code": "ZQ-90210-QZ",  # not a ZIP
    "first_name": "Xanthippe" * 6,  # longer than 50
    "email": "zephyrine.quill-at-example.org",  # no @
    "address_line1": "4471 Quillfeather Boulevard Apt 9Z",  # 34: fine alone ...
    "participant_id": "7.318642E+11",  # Excel's scientific notation
}
PLANTED["address_line1"] += " Rear"  # ... 39 characters: longer than 35
# a row rejected for a column that is not PHI (state): its PHI cells are valid and never stored
QUIET_NAME = "Wilhelmina-Quorra"


def _rows() -> list[dict]:
    rows = [seed_row(client_order_id="GOOD-1"), seed_row(client_order_id="GOOD-2", participant_id="22222")]
    rows += [seed_row(client_order_id=f"PHI-{column}", **{column: value}) for column, value in PLANTED.items()]
    rows.append(seed_row(client_order_id="PHI-quiet", state="XX", first_name=QUIET_NAME))
    return rows


def _raw_sqlite(engine) -> bytes:
    """Every byte of the SQLite warehouse: the database file and its -wal/-shm/-journal."""
    db = Path(engine.url.database)
    return b"".join(p.read_bytes() for p in sorted(db.parent.glob(db.name + "*"))
                    if p.name == db.name or p.name[len(db.name):] in warehouse.SQLITE_COMPANIONS)


def _text_of_every_column(engine) -> str:
    meta = sa.MetaData()
    meta.reflect(engine)
    parts = []
    with engine.connect() as conn:
        for table in meta.sorted_tables:
            for row in conn.execute(sa.select(table)):
                for value in row:
                    if value is None:
                        continue
                    if isinstance(value, bytes | memoryview):
                        parts.append(bytes(value).decode("utf-8", "replace"))
                    else:
                        parts.append(value if isinstance(value, str) else json.dumps(value, default=str))
    return "\n".join(parts)


def _found(engine, secrets) -> list[str]:
    if engine.dialect.name == "sqlite":
        raw = _raw_sqlite(engine)
        return [s for s in secrets if s.encode() in raw]
    text = _text_of_every_column(engine)
    return [s for s in secrets if s in text]


def _inbox(settings):
    settings.inbox.mkdir(parents=True, exist_ok=True)
    return replace(fast(settings), inbox_settle_seconds=0.0)


# ---- point 1: minimum necessary at rest ------------------------------------------------------

def test_a_partly_bad_batch_leaves_no_rejected_phi_in_the_warehouse(engine, settings, sandbox):
    from etl.orders import inbox

    assert all(is_phi(column) for column in PLANTED) and not is_phi("state")  # as the contract declares
    s = _inbox(settings)
    write_csv(s.inbox / "orders.csv", _rows())
    (outcome,) = inbox.run_once(engine, s).outcomes
    assert outcome["status"] == "loaded"
    assert outcome["counts"] == {"accepted": 2, "rejected before sending": len(PLANTED) + 1}

    # nowhere in the warehouse: not in rejected_rows.value, not in a reason, not in a freed page
    assert _found(engine, [*PLANTED.values(), QUIET_NAME]) == []
    with engine.connect() as conn:
        stored = {r.client_order_id: r for r in conn.execute(sa.select(rejected_rows))}
    for column, value in PLANTED.items():
        row = stored[f"PHI-{column}"]
        assert (row.column_name, row.value) == (column, None)
        assert row.reason.startswith(column + " ") and value not in row.reason  # the column and the rule
    assert stored["PHI-dob"].reason == "dob is not a real calendar date"
    assert (stored["PHI-quiet"].column_name, stored["PHI-quiet"].value) == ("state", "XX")  # not PHI: kept

    # beside the batch, a person still has every cell to mend the rows
    processed = s.inbox / "processed"
    report = {(r["client_order_id"], r["column"]): r["value"] for r in read_rows(processed / "orders.rejects.csv")}
    assert all(report[(f"PHI-{c}", c)] == v for c, v in PLANTED.items())
    fix = {r["client_order_id"]: r for r in read_rows(processed / "orders.fix.csv")}
    assert all(fix[f"PHI-{c}"][c] == v for c, v in PLANTED.items()) and fix["PHI-quiet"]["first_name"] == QUIET_NAME
    page = (processed / "orders.summary.html").read_text(encoding="utf-8")
    assert "dob is not a real calendar date" in page and "orders.fix.csv" in page


@pytest.mark.parametrize("contract", [order_batch, order_intents], ids=["order batch", "intents"])
def test_no_reason_quotes_a_phi_cell_whatever_rule_it_broke(contract):
    """Every reason of every rule, and the fallbacks, for every PHI column: the column named,
    the cell (or anything made from it) never. Values that trip each branch of the sentences."""
    schema = contract.SCHEMA if contract is order_batch else contract.CONTRACT.schema
    extra = "custom.SubscriberID" if contract is order_batch else "metadata.Visit"
    phi = sorted(PHI) if contract is order_batch else sorted(order_intents.PHI)
    rules = {c: [chk.name for chk in col.checks] for c, col in schema.columns.items()}
    rules[extra] = next((names for c, names in rules.items() if c.startswith("^")), [])  # custom.* (regex)
    # the rules of each PHI column, every generic sentence, a rule named later, the block rules
    cases = [(c, chk) for c in [*phi, extra] for chk in [*rules.get(c, []), "not_nullable", "some_future_rule"]]
    cases += [(c, chk.name) for chk in schema.checks for c in phi if chk.name == f"requires:{c}"]
    if contract is order_batch:
        assert {"past_date", "us_zip", "email_format", "str_length", "not_scientific",
                "requires:insurance_policy_number"} <= {chk for _, chk in cases}
    else:
        cases += [(c, f"requires:{c}") for c in order_intents.PATIENT_FIELDS]
    values = ["1985-02-30", "2/11/1961", "2099-01-01", "1850-01-01", "1985-13-45", "2134", "2134-1234",
              "7.318642E+11", "44", "Zelda Quist", "GLCS:zero", "123456789", "x" * 120]
    for column, check in cases:
        for value in values:
            reason = contract.reason_for(check, column, value)
            assert column in reason and value not in reason, (check, column, value, reason)
            assert value.lstrip("0") not in reason and "02134" not in reason, (check, column, reason)
            assert value[:20] not in reason, (check, column, reason)  # nor the start of a long one
    # a column that is not PHI keeps its value in the reason (what a person reads on the page)
    assert "'XX'" in order_batch.reason_for("isin", "state", "XX")


def test_every_settled_row_loses_its_body_and_only_rows_that_may_go_out_keep_one(engine, settings, sandbox):
    """The outbox's PHI goes in the statement that settles a row, on every path: accepted,
    rejected, conflict, already settled (by an earlier batch), accepted after a GET confirmed an
    unconfirmed row, and given up then sent again; a failed, unconfirmed or given-up row keeps
    its sealed body (it may be sent again: a later run, `labsync retry --given-up`)."""
    from starlette.responses import Response

    from etl.orders import ledger
    from etl.orders import outbox as ob
    from etl.orders.load import load_rows
    from tests.test_lgc_support import load_batch

    box = lgc(sandbox)
    s = replace(fast(settings), max_attempts=2)
    box.forced.update({"ORD-00002": 400, "ORD-00003": 409, "ORD-00004": 503})
    box.answers["ORD-00005"] = lambda rq, raw: Response("<html>hello</html>", status_code=200, media_type="text/html")
    rows = [order_row(i) for i in range(1, 6)]
    load_rows(engine, s, rows)
    first = outbox_rows(engine)
    batch_a = first["ORD-00001"]["batch_id"]

    def bodies(batch_id: int) -> dict[str, tuple[str, bool]]:
        return {k: (v["outcome"], v["body"] is not None) for k, v in outbox_rows(engine, batch_id).items()}

    assert bodies(batch_a) == {"ORD-00001": ("accepted", False), "ORD-00002": ("rejected", False),
                               "ORD-00003": ("conflict", False), "ORD-00004": ("failed", True),
                               "ORD-00005": ("unconfirmed", True)}
    assert all(v["body"].startswith("fernet:") for v in first.values() if v["body"] is not None)

    # a GET confirms the unconfirmed order: accepted, its body gone
    assert ledger.confirm(engine, "ORD-00005", [{"code": "GLCS", "id": "x"}])
    assert bodies(batch_a)["ORD-00005"] == ("accepted", False)

    # the same rows in a new batch: settled by the first, never sent again, no body kept
    box.answers.clear()
    batch_b = ob.adhoc_batch(engine, "again")
    load_rows(engine, s, rows[:3], batch_id=batch_b)
    assert bodies(batch_b) == {"ORD-00001": ("already_settled", False), "ORD-00002": ("already_settled", False),
                               "ORD-00003": ("conflict", False)}

    # the 503 row's second and last attempt: given up, its body kept for a person's retry
    load_batch(engine, s, batch_a)
    assert bodies(batch_a)["ORD-00004"] == ("given_up", True)
    box.forced.clear()
    assert ob.reset_given_up(engine) == 1
    load_batch(engine, s, batch_a)
    assert bodies(batch_a)["ORD-00004"] == ("accepted", False)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(lgc_outbox)
                            .where(lgc_outbox.c.body.is_not(None))).scalar_one() == 0


def _modes(folder: Path, name: str) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.name.startswith(name)}


@pytest.fixture
def open_umask():
    """A umask that lets every file be created readable by everyone (the usual 022)."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_the_embedded_warehouse_and_its_wal_and_shm_are_private(tmp_path, open_umask):
    url = f"sqlite:///{tmp_path / 'labsync.db'}"
    engine = warehouse.upgrade_url(url)
    try:
        with engine.connect() as conn:  # held open: the -wal and -shm exist while it is
            with conn.begin():
                conn.execute(sa.insert(batch_files).values(file_name="x.csv", sha256="0" * 64, status="received",
                                                           received_at=sa.func.current_timestamp()))
            modes = _modes(tmp_path, "labsync.db")
            assert {"labsync.db", "labsync.db-wal", "labsync.db-shm"} <= set(modes)
            from etl.vault import vault_for

            vault_for(None, engine)  # the key file beside it (0600 since issue 10)
            modes = _modes(tmp_path, "labsync.db")
    finally:
        engine.dispose()
    assert modes == dict.fromkeys(modes, 0o600) and "labsync.db.key" in modes, {k: oct(v) for k, v in modes.items()}
    # and files made later, after the first process is gone
    again = warehouse.connect(url)
    with again.connect() as conn:
        conn.execute(sa.select(1)).all()
        assert set(_modes(tmp_path, "labsync.db").values()) == {0o600}
    again.dispose()


def test_a_rollback_journal_gets_the_database_files_mode(tmp_path, open_umask):
    db = tmp_path / "journal.db"
    warehouse.make_engine(f"sqlite:///{db}").dispose()  # creates the file, 0600
    con = sqlite3.connect(db, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=DELETE")
        con.execute("BEGIN IMMEDIATE")
        con.execute("CREATE TABLE t (x)")
        con.execute("INSERT INTO t VALUES ('x')")
        journal = tmp_path / "journal.db-journal"
        assert journal.exists()
        assert stat.S_IMODE(journal.stat().st_mode) == 0o600
        con.execute("COMMIT")
    finally:
        con.close()


def test_a_world_readable_warehouse_of_an_older_labsync_is_closed_to_others(tmp_path, open_umask):
    db = tmp_path / "old.db"
    sqlite3.connect(db).close()
    os.chmod(db, 0o664)  # an older labsync, a group-shared deployment: the group keeps its access
    warehouse.make_engine(f"sqlite:///{db}").dispose()
    assert stat.S_IMODE(db.stat().st_mode) == 0o660


# ---- point 2: no PHI in errors ------------------------------------------------------------------

def _refuse(engine, table: str, column: str, value: str) -> None:
    """A rule of the database's own (a DBA's constraint) that refuses rows whose `column` is
    `value`: a trigger on SQLite (IntegrityError), a CHECK constraint on PostgreSQL (its error
    text quotes the whole failing row)."""
    with engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql(f"CREATE TRIGGER test_refuse BEFORE INSERT ON {table} WHEN NEW.{column} = "
                                 f"'{value}' BEGIN SELECT RAISE(ABORT, 'refused by a rule of this warehouse'); END")
        else:
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD CONSTRAINT test_refuse CHECK ({column} <> '{value}')")


def _allow(engine, table: str) -> None:
    with engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("DROP TRIGGER test_refuse")
        else:
            conn.exec_driver_sql(f"ALTER TABLE {table} DROP CONSTRAINT test_refuse")


def test_the_engine_hides_bound_parameters(engine):
    with pytest.raises(sa.exc.IntegrityError) as info, engine.begin() as conn:
        conn.execute(sa.insert(rejected_rows).values(batch_id=1, line=2, column_name="dob", value=PLANTED["dob"],
                                                     reason="x"))  # no batch 1: a foreign key refuses it
    assert PLANTED["dob"] not in str(info.value)


def _leaks(text: str, secrets) -> list[str]:
    return [s for s in secrets if s in text]


def test_a_rejected_row_the_database_refuses_fails_the_file_plainly(run, engine, settings, sandbox, tmp_path,
                                                                    caplog):
    """`labsync load`: the warehouse refuses the rejected rows of a file (a rule of its own): the
    file fails with exit 2 and one plain line naming the table and the error's class; nothing
    is sent, no value shows anywhere, and the same command goes through once the rule is gone."""
    caplog.set_level(logging.DEBUG)
    bad = seed_row(client_order_id="PHI-1", dob=PLANTED["dob"], phone_number=PLANTED["phone_number"],
                   postal_code=PLANTED["postal_code"])
    folder = tmp_path / "drop"
    folder.mkdir()
    path = write_csv(folder / "refused.csv", [seed_row(client_order_id="GOOD-1"), bad])
    _refuse(engine, "rejected_rows", "column_name", "dob")

    code, out, err = run("load", str(path))
    assert code == 2, (out, err)
    assert err.startswith("labsync: refused.csv: the warehouse refused to store the batch's rejected rows "
                          "(table rejected_rows) (IntegrityError") and err.count("\n") == 1, err
    assert "nothing was sent" in err and "Traceback" not in out + err
    secrets = [*PLANTED.values(), bad["first_name"], bad["last_name"], bad["email"]]
    assert _leaks(out + err + caplog.text, secrets) == []
    assert dict(lgc(sandbox).put_count) == {}  # nothing sent
    with engine.connect() as conn:
        status, error = conn.execute(sa.select(batch_files.c.status, batch_files.c.error)).one()
        assert conn.execute(sa.select(sa.func.count()).select_from(lgc_outbox)).scalar_one() == 0
    assert status == "received" and "rejected_rows" in error and _leaks(error, secrets) == []
    assert sorted(p.name for p in folder.iterdir()) == ["refused.csv"]  # no half-recorded reports

    _allow(engine, "rejected_rows")
    code, out, err = run("load", str(path))
    assert code == 1 and "1 rejected" in out, (out, err)  # the row to mend; GOOD-1 went through
    assert dict(lgc(sandbox).put_count) == {"GOOD-1": 1}
    with engine.connect() as conn:
        assert conn.execute(sa.select(batch_files.c.status, batch_files.c.error)).one() == ("loaded", None)
    assert _found(engine, [PLANTED["dob"], PLANTED["phone_number"], PLANTED["postal_code"]]) == []


def test_in_the_inbox_the_refused_file_fails_and_the_run_goes_on(engine, settings, sandbox, caplog):
    from etl.orders import inbox

    caplog.set_level(logging.DEBUG)
    s = _inbox(settings)
    write_csv(s.inbox / "good.csv", [seed_row(client_order_id="GOOD-1")])
    write_csv(s.inbox / "refused.csv", [seed_row(client_order_id="GOOD-2"),
                                        seed_row(client_order_id="PHI-1", dob=PLANTED["dob"])])
    _refuse(engine, "rejected_rows", "column_name", "dob")
    outcomes = {o["name"]: o for o in inbox.run_once(engine, s).outcomes}
    assert outcomes["good.csv"]["status"] == "loaded"
    assert outcomes["refused.csv"]["status"] == "unusable"
    assert "(table rejected_rows) (IntegrityError" in outcomes["refused.csv"]["error"]
    page = (s.inbox / "failed" / "refused.summary.html").read_text(encoding="utf-8")
    assert "table rejected_rows" in page
    assert dict(lgc(sandbox).put_count) == {"GOOD-1": 1}
    assert _leaks(caplog.text + json.dumps(outcomes, default=str) + page, [PLANTED["dob"]]) == []

    # once the warehouse takes them, the same file dropped again goes through
    _allow(engine, "rejected_rows")
    (s.inbox / "failed" / "refused.csv").rename(s.inbox / "refused.csv")
    (again,) = inbox.run_once(engine, s).outcomes
    assert again["status"] == "loaded" and again["counts"] == {"accepted": 1, "rejected before sending": 1}


def test_a_result_the_database_refuses_fails_that_item_alone_with_no_value_shown(run, engine, settings, sandbox,
                                                                                caplog):
    """`labsync results`: the database refuses one biomarker's row (a rule of its own): that item
    fails with the error's class, the other item's results are stored, the command says so with
    exit 1; no biomarker, value or patient detail appears in the output or a log line. The next
    run, the rule gone, stores the refused item."""
    from etl.orders.lifecycle import track
    from etl.orders.results import fetch_results
    from etl.warehouse.tables import lgc_result_values, lgc_results

    caplog.set_level(logging.DEBUG)
    s = quick(settings)
    patient = dict(first_name="Zelphinia", last_name="Quorrington", dob="1977-03-29")
    (coid,) = place_orders(engine, s, 1, **patient)  # GLCS and FCIT
    sb = lgc(sandbox).lifecycle
    sb.advance(coid, to="ResultsAvailable")
    track(engine, s)
    refused = "Fecal Immunochemical Test"
    _refuse(engine, "lgc_result_values", "biomarker_name", refused)

    code, out, err = run("results")
    assert code == 1, (out, err)
    assert "1 stored" in out and "1 failed" in out
    fcit = next(i for i in sb.orders[coid].items if i.code == "FCIT")
    secrets = {refused, *patient.values(), "Detected", "Not Detected"}
    for item in sb.orders[coid].items:
        for r in sb.panel(item):
            secrets |= {r["biomarkerName"], r["headline"], r["description"]}
    printed = out + err + caplog.text
    leaked = [v for v in secrets if re.search(rf"(?<![\w.:]){re.escape(v)}(?![\w])", printed)]
    assert leaked == [] and "Traceback" not in printed
    assert f"item {fcit.id}" in caplog.text and "IntegrityError" in caplog.text
    with engine.connect() as conn:
        assert conn.execute(sa.select(lgc_results.c.item_id)).scalars().all() != [fcit.id]
        assert conn.execute(sa.select(sa.func.count()).select_from(lgc_results)
                            .where(lgc_results.c.item_id == fcit.id)).scalar_one() == 0  # rolled back whole

    _allow(engine, "lgc_result_values")
    later = fetch_results(engine, s)
    assert (later.stored, later.failed) == (1, {})
    with engine.connect() as conn:
        assert refused in conn.execute(sa.select(lgc_result_values.c.biomarker_name)).scalars().all()


def test_a_parser_error_fails_that_item_alone_with_its_class(engine, monkeypatch):
    from etl.errors import ApiError
    from etl.orders import results

    def trips(document):
        raise TypeError(f"cannot read {document[:40]!r}")  # a bug that quotes the document

    monkeypatch.setattr(results, "parse_results", trips)
    c = results._Candidate("item-x", "ORD-X", "LGC-0000-0000-0009", "ABCDEF", False)
    with pytest.raises(ApiError) as info:
        results.store_result(engine, c, b'{"testResults":[{"biomarkerName":"Zelda HIV"}]}', None)
    assert str(info.value) == "the results document could not be read (TypeError); not stored"
    assert info.value.__cause__ is None and info.value.__suppress_context__
