"""The inbox pipeline without Airflow (prepare -> load_chunk -> finish), against the sandbox over
real HTTP, on SQLite and PostgreSQL: outcomes, file moves, summaries, exactly-once by content,
files claimed in the warehouse (several runs at once, runs that die), bad files that never
block the inbox, rows that go out again by themselves."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from etl import warehouse
from etl.claims import now, run_owner, task_owner
from etl.cli import main
from etl.orders import inbox
from etl.warehouse import batch_files, lgc_orders, lgc_outbox, rejected_rows
from tests.helpers import EXAMPLES, seed_row, write_csv
from tests.inboxes import InboxView
from tests.test_lgc_support import LABSYNC, cli_env, csv_row, outbox_rows

OWNER = "cli:test-inbox"


@pytest.fixture
def box(settings, inbox_location):
    """(settings, the inbox, engine): every test here runs on a local folder and on the S3 server."""
    settings = replace(settings, inbox=inbox_location, inbox_settle_seconds=0.0, chunk_rows=4)
    inbox.open_inbox(settings)
    return settings, InboxView(inbox_location), warehouse.connect(settings.warehouse_url)


def drop(paths: InboxView, *names) -> None:
    paths.drop(*names)


def ledger(engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(lgc_orders.c.client_order_id, lgc_orders.c.state)).all())


def statuses(engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(batch_files.c.file_name, batch_files.c.status)).all())


def run(engine, settings, **kw) -> list[dict]:
    return inbox.run_once(engine, settings, **kw).outcomes


def lapse_every_claim(engine) -> None:
    """The run holding them died: its leases run out."""
    past = now() - timedelta(seconds=1)
    with engine.begin() as conn:
        conn.execute(sa.update(batch_files).where(batch_files.c.claimed_by.is_not(None)).values(claimed_until=past))
        conn.execute(sa.update(lgc_orders).where(lgc_orders.c.claimed_by.is_not(None)).values(claimed_until=past))


def test_good_partly_bad_and_unusable_files(box, sandbox):
    settings, paths, engine = box
    drop(paths, "orders.csv", "orders_broken.csv", "orders_unusable.csv")
    outcomes = {o["name"]: o for o in run(engine, settings)}

    assert outcomes["orders.csv"]["counts"] == {"accepted": 10, "rejected before sending": 0}
    assert outcomes["orders_broken.csv"]["counts"] == {"accepted": 2, "rejected before sending": 6}
    assert outcomes["orders_unusable.csv"]["status"] == "unusable"
    # 10 + 2 orders, each sent once; chunk_rows=4 split the good file over 3 chunks
    assert len(sandbox.sandbox.lgc.orders) == 12 and set(sandbox.sandbox.lgc.accepted_count.values()) == {1}
    assert set(ledger(engine).values()) == {"accepted"} and len(ledger(engine)) == 12

    assert paths.names("processed") == [
        "orders.csv", "orders.summary.html", "orders_broken.csv", "orders_broken.fix.csv",
        "orders_broken.rejects.csv", "orders_broken.summary.html"]
    assert paths.names("failed") == ["orders_unusable.csv", "orders_unusable.summary.html"]
    assert paths.names() == []  # no staging left anywhere

    page = paths.read("processed/orders_broken.summary.html")
    assert "already appears on line 2" in page and "BROKEN-0008" in page and "Rejected rows" in page
    ids = sandbox.sandbox.lgc.orders["BROKEN-0008"]["response"]["orderItems"]
    assert all(item["id"] in page for item in ids)
    assert "comma-separated" in paths.read("failed/orders_unusable.summary.html")
    with engine.connect() as conn:
        n_rejects = conn.execute(sa.select(sa.func.count()).select_from(rejected_rows)).scalar_one()
        bodies = conn.execute(sa.select(sa.func.count()).select_from(lgc_outbox)
                              .where(lgc_outbox.c.body.is_not(None))).scalar_one()
        claims = conn.execute(sa.select(sa.func.count()).select_from(batch_files)
                              .where(batch_files.c.claimed_by.is_not(None))).scalar_one()
        stored = dict(conn.execute(sa.select(batch_files.c.file_name, batch_files.c.stored_as)).all())
    assert statuses(engine) == {"orders.csv": "loaded", "orders_broken.csv": "loaded", "orders_unusable.csv": "unusable"}
    assert n_rejects == 13
    assert bodies == 0 and claims == 0  # PHI deleted once settled; every claim released
    assert stored == {"orders.csv": "processed/orders.csv", "orders_broken.csv": "processed/orders_broken.csv",
                      "orders_unusable.csv": "failed/orders_unusable.csv"}


def test_second_run_and_redropped_copy_send_nothing(box, sandbox):
    settings, paths, engine = box
    drop(paths, "orders.csv")
    run(engine, settings)
    puts = sum(sandbox.sandbox.lgc.put_count.values())

    assert run(engine, settings) == []  # empty inbox, nothing to resume
    paths.put(EXAMPLES / "orders.csv", "renamed copy.csv")
    (outcome,) = run(engine, settings)
    assert outcome["status"] == "duplicate"
    assert sum(sandbox.sandbox.lgc.put_count.values()) == puts
    assert "Already processed" in paths.read("processed/renamed copy.summary.html")


def test_two_copies_dropped_together_are_one_batch_sent_once(box, sandbox):
    settings, paths, engine = box
    drop(paths, "orders.csv")
    paths.put(EXAMPLES / "orders.csv", "orders copy.csv")
    (first,) = run(engine, settings)  # one copy is the batch; the other waits for the next run
    assert first["status"] == "loaded" and first["counts"]["accepted"] == 10
    (second,) = run(engine, settings)
    assert second["status"] == "duplicate"
    assert set(sandbox.sandbox.lgc.put_count.values()) == {1} and len(sandbox.sandbox.lgc.orders) == 10
    assert [n for n in paths.names("processed") if n.endswith(".csv")] == ["orders copy.csv", "orders.csv"]


def test_failed_rows_go_out_again_by_themselves_and_the_summary_is_rewritten(box, sandbox):
    settings, paths, engine = box
    lgc = sandbox.sandbox.lgc
    lgc.forced["DEMO-2026-0003"] = 503  # retried until the budget is spent -> failed
    drop(paths, "orders.csv")
    (first,) = run(engine, settings)
    assert first["counts"] == {"accepted": 9, "failed": 1, "rejected before sending": 0}
    assert first["status"] == "incomplete"
    page = paths.read("processed/orders.summary.html")
    assert "Orders that did not go through" in page and "sends them again by itself" in page

    lgc.forced.clear()
    before = dict(lgc.put_count)
    (second,) = run(engine, settings)  # nothing dropped: the next run resumes the batch itself
    sent_again = {k for k, v in lgc.put_count.items() if v != before.get(k)}
    assert sent_again == {"DEMO-2026-0003"}
    assert second["retried"] and second["status"] == "loaded"
    assert second["counts"] == {"accepted": 10, "rejected before sending": 0}
    assert ledger(engine)["DEMO-2026-0003"] == "accepted"
    page = paths.read("processed/orders.summary.html")  # written again, in place
    assert "All 10 rows went through" in page and "did not go through" not in page
    assert run(engine, settings) == []  # and then there is nothing left to do


def test_rows_failing_every_time_are_given_up_and_a_redrop_sends_them(box, sandbox):
    settings, paths, engine = box
    settings = replace(settings, max_attempts=2)
    lgc = sandbox.sandbox.lgc
    lgc.forced["DEMO-2026-0003"] = 503
    drop(paths, "orders.csv")
    assert run(engine, settings)[0]["counts"]["failed"] == 1  # attempt 1
    (again,) = run(engine, settings)  # attempt 2, the last: needs a person now
    assert again["status"] == "incomplete" and again["counts"]["given_up"] == 1
    row = outbox_rows(engine)["DEMO-2026-0003"]
    assert row["outcome"] == "given_up" and row["attempts"] == 2 and row["body"] is not None
    puts = lgc.put_count["DEMO-2026-0003"]
    assert run(engine, settings) == []  # given up: later runs leave it alone
    assert lgc.put_count["DEMO-2026-0003"] == puts
    page = paths.read("processed/orders.summary.html")
    assert "need a person" in page and "failed (given up)" in page

    lgc.forced.clear()  # a person fixed the cause and drops the file again
    drop(paths, "orders.csv")
    before = dict(lgc.put_count)
    (redrop,) = run(engine, settings)
    assert {k for k, v in lgc.put_count.items() if v != before.get(k)} == {"DEMO-2026-0003"}
    assert redrop["status"] == "loaded" and redrop["counts"]["accepted"] == 10
    assert paths.exists("processed/orders.2.csv")  # the earlier file is never overwritten


def test_a_run_that_died_is_taken_over_without_duplicates(box, sandbox):
    settings, paths, engine = box
    drop(paths, "orders.csv")
    dead = run_owner("order_batches", "scheduled__1")
    prepared = inbox.prepare(engine, settings, owner=dead)
    inbox.load_chunk(engine, settings, prepared["chunks"][0], owner=task_owner("order_batches", "scheduled__1", "load", 0),
                     file_owner=dead)  # then the whole run "dies"
    assert paths.exists("orders.csv")
    assert run(engine, settings, owner=OWNER) == []  # its claim is live: the file is left alone
    lapse_every_claim(engine)

    (outcome,) = run(engine, settings, owner=OWNER)
    assert outcome["status"] == "loaded" and outcome["counts"]["accepted"] == 10
    assert set(sandbox.sandbox.lgc.accepted_count.values()) == {1}
    assert len(sandbox.sandbox.lgc.orders) == 10
    assert inbox.finish(engine, settings, prepared, owner=dead)[0]["taken_over"]  # the dead run's finish: a no-op
    assert paths.names("processed") == ["orders.csv", "orders.summary.html"]


def test_a_run_that_died_while_validating_is_redone_from_scratch(box, sandbox):
    settings, paths, engine = box
    drop(paths, "orders.csv")
    from etl.orders import staging

    sha = inbox.fingerprint(paths.store, "orders.csv")
    taken = staging.take(engine, settings, "orders.csv", sha, owner="cli:dead")
    from etl.orders import outbox
    from etl.vault import vault_for

    outbox.write(engine, taken.batch_id, [{"line": 2, "client_order_id": "HALF-WRITTEN"}],  # half a file
                 vault=vault_for(settings.fernet_key, engine))
    lapse_every_claim(engine)
    (outcome,) = run(engine, settings, owner=OWNER)
    assert outcome["status"] == "loaded" and outcome["counts"] == {"accepted": 10, "rejected before sending": 0}
    assert "HALF-WRITTEN" not in outbox_rows(engine) and "HALF-WRITTEN" not in sandbox.sandbox.lgc.put_count


def test_a_file_still_being_written_waits_for_the_next_run(box, sandbox):
    settings, paths, engine = box
    drop(paths, "orders.csv")
    assert inbox.prepare(engine, replace(settings, inbox_settle_seconds=60), owner=OWNER)["batches"] == []
    (entry,) = paths.store.files()  # the store's own clock says when it was written
    settled = max(0.0, time.time() - entry.mtime - 1)  # younger than the file (a setting is never negative)
    assert len(inbox.prepare(engine, replace(settings, inbox_settle_seconds=settled), owner=OWNER)["batches"]) == 1


@pytest.fixture
def late_failure(monkeypatch):
    """How a stray quote makes a file unusable near its end: the rest of the file becomes one
    quoted cell, which outgrows the csv field limit (16 MiB in production, 4 KiB here so the file
    stays small) and the reader fails on the last line. Validation in steps of 100 rows, so rows
    before it were checked, and staged, before the file proved unusable."""
    import csv

    import etl.intake.validate  # noqa: F401  (it sets the production limit when first imported)
    from etl.orders import staging

    old = csv.field_size_limit(4096)
    monkeypatch.setattr(staging, "VALIDATION_CHUNK_ROWS", 100)
    yield
    csv.field_size_limit(old)


def _unusable_at_last_line(path: Path, good_rows: int) -> Path:
    write_csv(path, [seed_row(client_order_id=f"LAST-{i:04d}") for i in range(good_rows)])
    with open(path, "a", encoding="utf-8") as f:
        f.write('LAST-9999,"a stray quote\n')
        f.writelines(f"LAST-{i},{'x' * 200}\n" for i in range(10000, 10020))  # over the limit on line 322, the last
    return path


def test_a_file_unusable_at_its_last_line_sends_nothing_and_the_good_files_beside_it_go_on(box, sandbox, late_failure,
                                                                                           tmp_path):
    settings, paths, engine = box
    settings = replace(settings, chunk_rows=5000)
    paths.put(_unusable_at_last_line(tmp_path / "a_bad.csv", 300), "a_bad.csv")
    paths.write_csv("b_good.csv", [seed_row(client_order_id=f"GOOD-{i}") for i in range(3)])
    drop(paths, "orders.csv")
    outcomes = {o["name"]: o for o in run(engine, settings)}
    assert outcomes["a_bad.csv"]["status"] == "unusable" and "line 322" in outcomes["a_bad.csv"]["error"]
    assert outcomes["b_good.csv"]["status"] == "loaded" and outcomes["orders.csv"]["status"] == "loaded"
    lgc = sandbox.sandbox.lgc
    assert not any(k.startswith("LAST-") for k in lgc.put_count)  # nothing of the bad file was sent
    assert len(lgc.orders) == 13
    assert not any(k.startswith("LAST-") for k in outbox_rows(engine))  # its staged rows are gone
    assert paths.names("failed") == ["a_bad.csv", "a_bad.summary.html"]
    assert "not valid CSV" in paths.read("failed/a_bad.summary.html")


def test_cli_load_of_a_file_unusable_at_its_last_line_sends_nothing(settings, sandbox, monkeypatch, capsys, tmp_path,
                                                                   late_failure):
    path = _unusable_at_last_line(tmp_path / "late.csv", 300)
    for key, value in cli_env(settings).items():
        if key.startswith(("LGC_", "LABSYNC_")):
            monkeypatch.setenv(key, value)
    assert main(["load", str(path)]) == 2
    err = capsys.readouterr().err
    assert "line 322" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sandbox.sandbox.lgc.put_count == {}
    engine = warehouse.connect(settings.warehouse_url)
    assert outbox_rows(engine) == {} and set(statuses(engine).values()) == {"unusable"}


def test_cli_inbox_exit_codes(box, sandbox, monkeypatch, capsys):
    settings, paths, engine = box
    monkeypatch.setenv("LABSYNC_WAREHOUSE_URL", settings.warehouse_url)
    monkeypatch.setenv("LABSYNC_FERNET_KEY", settings.fernet_key)
    monkeypatch.setenv("LGC_BASE_URL", settings.lgc.base_url)
    monkeypatch.setenv("LABSYNC_INBOX_SETTLE_SECONDS", "0")
    paths.write_csv("one.csv", [seed_row(client_order_id="CLI-1")])
    assert main(["inbox", "--folder", paths.location]) == 0
    drop(paths, "orders_broken.csv")
    assert main(["inbox", "--folder", paths.location]) == 1
    out = capsys.readouterr().out
    assert "one.csv: loaded (accepted 1)" in out and "orders_broken.csv: loaded (accepted 2, rejected before sending 6)" in out
    assert main(["batches"]) == 0
    assert "orders_broken.csv" in capsys.readouterr().out


def test_rows_of_a_load_task_that_died_go_out_on_the_next_run(box, sandbox):
    """The DAG's finish runs even when a load task failed for good (vendor down longer than the
    task's retries). Its rows were never sent: the summary must say so, the batch is
    `incomplete`, and the next run sends them by itself."""
    settings, paths, engine = box
    drop(paths, "orders.csv")
    prepared = inbox.prepare(engine, settings, owner=OWNER)
    (outcome,) = inbox.finish(engine, settings, prepared, owner=OWNER)
    assert outcome["counts"]["queued"] == 10 and outcome["status"] == "incomplete"
    page = paths.read("processed/orders.summary.html")
    assert "10 not sent yet (queued) (counted as pending)" in page and "sends them again by itself" in page
    assert sandbox.sandbox.lgc.orders == {}
    with pytest.raises(inbox.BatchesNeedAttention, match="orders.csv incomplete"):
        inbox.check([outcome])

    (again,) = run(engine, settings)
    assert again["status"] == "loaded" and again["counts"]["accepted"] == 10
    assert len(sandbox.sandbox.lgc.orders) == 10
    inbox.check([again])  # the later run is fine


def test_cli_inbox_with_the_vendor_down_finishes_every_file_and_the_next_run_sends(box, sandbox, monkeypatch, capsys):
    settings, paths, engine = box
    monkeypatch.setenv("LABSYNC_WAREHOUSE_URL", settings.warehouse_url)
    monkeypatch.setenv("LABSYNC_FERNET_KEY", settings.fernet_key)
    monkeypatch.setenv("LGC_BASE_URL", settings.lgc.base_url)
    monkeypatch.setenv("LABSYNC_INBOX_SETTLE_SECONDS", "0")
    monkeypatch.setenv("LABSYNC_RETRY_INITIAL_WAIT", "0.01")
    monkeypatch.setenv("LABSYNC_RETRY_ATTEMPTS", "3")
    drop(paths, "orders.csv")
    sandbox.sandbox.lgc.faults.update(script=[503] * 3)  # the token endpoint fails every try
    assert main(["inbox", "--folder", paths.location]) == 1
    captured = capsys.readouterr()
    assert "go out on the next run" in captured.err and "Traceback" not in captured.err
    assert "orders.csv: incomplete (queued 10" in captured.out
    assert paths.exists("processed/orders.csv") and sandbox.sandbox.lgc.orders == {}

    assert main(["inbox", "--folder", paths.location]) == 0  # the vendor is back
    assert "orders.csv (rows sent again): loaded (accepted 10" in capsys.readouterr().out
    assert len(sandbox.sandbox.lgc.orders) == 10 and statuses(engine) == {"orders.csv": "loaded"}


def test_two_inbox_processes_on_one_inbox_with_three_files(box, sandbox, tmp_path):
    """Two `labsync inbox` processes started together: each file is processed by exactly one of
    them, nothing is sent twice, nobody moves or deletes the other's work, every batch ends in
    its true state."""
    settings, paths, engine = box
    lgc = sandbox.sandbox.lgc
    lgc.faults.update(latency=0.01)
    for name in ("one", "two", "three"):
        paths.write_csv(f"{name}.csv", [csv_row(i, client_order_id=f"{name.upper()}-{i}") for i in range(40)])
    env = cli_env(settings, LABSYNC_INBOX=paths.location, LABSYNC_INBOX_SETTLE_SECONDS="0",
                  LABSYNC_CHUNK_ROWS="10")
    procs = [subprocess.Popen([*LABSYNC, "inbox"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, out + err
        assert "Traceback" not in err
    said = "\n".join(out for out, _ in results)
    for name in ("one", "two", "three"):  # each file reported by one process only
        assert said.count(f"{name}.csv: loaded (accepted 40") == 1, said
    assert paths.names("processed") == [
        "one.csv", "one.summary.html", "three.csv", "three.summary.html", "two.csv", "two.summary.html"]
    assert len(lgc.orders) == 120 and set(lgc.put_count.values()) == {1}
    assert statuses(engine) == {"one.csv": "loaded", "two.csv": "loaded", "three.csv": "loaded"}


def test_a_load_task_in_another_working_directory_and_temp_dir_loads_its_chunk(box, sandbox, tmp_path):
    """prepare on one 'worker', the load task on another: its own working directory, its own
    temp dir, no inbox at all. All it gets is the chunk (through XCom, as JSON) and the
    warehouse; the bodies come from the outbox."""
    settings, paths, engine = box
    drop(paths, "orders.csv")
    prepared = inbox.prepare(engine, replace(settings, chunk_rows=100), owner=OWNER)
    (chunk,) = prepared["chunks"]
    assert set(chunk) == {"batch_id", "first_id", "last_id", "rows", "file", "first_line", "last_line"}
    assert chunk["rows"] == 10 and (chunk["first_line"], chunk["last_line"]) == (2, 11)
    elsewhere = tmp_path / "worker-2"
    (elsewhere / "tmp").mkdir(parents=True)
    env = cli_env(settings, TMPDIR=str(elsewhere / "tmp"), LABSYNC_INBOX=str(elsewhere / "no-inbox-here"))
    code = ("import json, sys; from etl.airflow.tasks import inbox_load_chunk; "
            "print(json.dumps(inbox_load_chunk(json.loads(sys.argv[1]), ti_owner=sys.argv[2], run_owner=sys.argv[3])))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(chunk),
                           task_owner("order_batches", "r", "load", 0), OWNER],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["counts"] == {"accepted": 10}
    assert not (elsewhere / "no-inbox-here").exists()
    (outcome,) = inbox.finish(engine, settings, prepared, owner=OWNER)
    assert outcome["status"] == "loaded" and len(sandbox.sandbox.lgc.orders) == 10


def test_a_batch_file_is_hashed_once(box, monkeypatch):
    """The inbox hashes the file to know the batch (etl.intake.inbox.fingerprint); validation
    scans the local copy with that sha256 given, so it does not hash the bytes again."""
    import etl.intake.validate as validate

    settings, paths, engine = box
    drop(paths, "orders.csv")
    scans: list[str | None] = []
    scan = validate._scan

    def recording(path, sha256=None):
        scans.append(sha256)
        return scan(path, sha256)

    monkeypatch.setattr(validate, "_scan", recording)
    prepared = inbox.prepare(engine, settings, owner=OWNER)
    assert len(prepared["batches"]) == 1 and prepared["batches"][0]["valid_rows"] > 0
    with engine.connect() as conn:
        stored = conn.execute(sa.select(batch_files.c.sha256)).scalar_one()
    assert scans == [stored]  # one scan, given the claim's hash: no second hashing
