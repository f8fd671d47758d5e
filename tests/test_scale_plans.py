"""A warehouse that has run for years (issue 27): the statements a batch or a lifecycle run makes
read their own rows through an index, never the history, on SQLite and on PostgreSQL.

Each plan test fills the tables with a small history (a few thousand rows through plain inserts)
and reads the plan of the very statement the code runs (etl.warehouse.plans.explain: EXPLAIN
QUERY PLAN on SQLite, EXPLAIN on PostgreSQL). On PostgreSQL tables this small are cheaper to read
whole than through an index, so the plan tests run there with `SET enable_seqscan = off` in
their own connection: the test then shows that the index is usable by the statement as written
(its predicate implied, its columns matched) and chosen when it pays, which is what a later
change could silently break. SQLite is checked as labsync runs it (no ANALYZE), and once more
after an ANALYZE, which keeps no histogram and so sees `state = 'unconfirmed'` as most of the
ledger. Behaviour tests show the rows chosen are still the right ones. No timing is asserted:
bench/scale.py measures that.
"""

from __future__ import annotations

import contextlib
import re
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from etl.intake import records
from etl.orders import ledger, lifecycle
from etl.orders.results import candidates, candidates_query
from etl.states import FINAL_ITEM_STATUSES, WebhookEventState
from etl.warehouse.plans import explain, full_scans, uses_index
from etl.warehouse.tables import (
    OPEN_ITEM_SQL,
    batch_files,
    lgc_order_items,
    lgc_orders,
    lgc_outbox,
    lgc_results,
    webhook_events,
)

NOW = datetime.now(UTC)
HISTORY = 3_000  # orders of the history: enough rows that a scan and a search differ in a plan


def _fill(engine, orders: int = HISTORY, *, open_every: int = 10) -> None:
    """A history: batches of 100 orders, each order accepted, tracked, with two items; one
    order in `open_every` still open (checked a minute ago), the rest at ResultsAvailable with
    their results stored."""
    old = NOW - timedelta(days=400)
    with engine.begin() as conn:
        conn.execute(sa.insert(batch_files), [
            dict(id=b + 1, file_name=f"hist-{b:04d}.csv", sha256=f"{b:064d}", status="loaded", received_at=old,
                 total_rows=100)
            for b in range(orders // 100)])
        conn.execute(sa.insert(lgc_orders), [
            dict(client_order_id=f"H-{i:06d}", batch_id=i // 100 + 1, line=i % 100 + 2, state="accepted",
                 attempts=1, payload_sha256="0" * 64, created_at=old, updated_at=old, tracked_at=old)
            for i in range(orders)])
        conn.execute(sa.insert(lgc_outbox), [
            dict(batch_id=i // 100 + 1, line=i % 100 + 2, client_order_id=f"H-{i:06d}", body_sha256="0" * 64,
                 outcome="accepted", attempts=1, created_at=old, updated_at=old)
            for i in range(orders)])
        items = []
        for i in range(orders):
            is_open = i % open_every == 0
            for k in (1, 2):
                items.append(dict(
                    item_id=f"H-{i:06d}-{k}", client_order_id=f"H-{i:06d}", code="GLCS",
                    status="KitDispatched" if is_open else "ResultsAvailable",
                    barcode=None if is_open else f"B{i:06d}{k}", first_seen_at=old, updated_at=old,
                    last_checked_at=NOW - timedelta(minutes=1) if is_open else old,
                    results_stored_at=None if is_open else old))
        conn.execute(sa.insert(lgc_order_items), items)
        conn.execute(sa.insert(webhook_events), [
            dict(source="lgc", sha256=f"{e:064d}", event_type="order", body=b"{}", received_at=old,
                 state="applied", attempts=1, applied_at=old, authenticated=True)
            for e in range(orders // 2)])


@contextlib.contextmanager
def _conn(engine):
    """A connection whose planner prefers an index wherever one is usable (PostgreSQL: seq scans
    off, see the module's docstring); SQLite as it is."""
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("ANALYZE")
            conn.exec_driver_sql("SET enable_seqscan = off")
        yield conn


HISTORY_TABLES = ("lgc_orders", "lgc_order_items", "lgc_outbox", "batch_files", "webhook_events",
                  "lgc_item_status_history")


def _plan(engine, stmt) -> list[str]:
    with _conn(engine) as conn:
        return explain(conn, stmt)


def _assert_bounded(plan: list[str], *indexes: str) -> None:
    text = "\n".join(plan)
    for index in indexes:
        assert uses_index(plan, index), f"{index} not used:\n{text}"
    assert full_scans(plan, HISTORY_TABLES) == [], f"reads a history table whole:\n{text}"


# ---- the index predicate is the sweep's notion of an open item ---------------------------------

def test_the_open_item_predicate_names_exactly_the_final_statuses():
    from importlib import import_module

    migration = import_module("etl.warehouse.migrations.versions.0013_scale_indexes")
    listed = set(re.findall(r"'([A-Za-z]+)'", OPEN_ITEM_SQL))
    assert listed == {str(s) for s in FINAL_ITEM_STATUSES}
    assert migration.OPEN_ITEM_SQL == OPEN_ITEM_SQL  # the index the migration built is the one declared
    index = {i.name: i for i in lgc_order_items.indexes}["ix_lgc_order_items_open_checked"]
    assert str(index.dialect_options["postgresql"]["where"]) == OPEN_ITEM_SQL
    assert str(index.dialect_options["sqlite"]["where"]) == OPEN_ITEM_SQL


def test_the_migration_built_the_declared_indexes(engine):
    wanted = {"lgc_order_items": {"ix_lgc_order_items_open_checked", "ix_lgc_order_items_status_results_stored_at"},
              "lgc_orders": {"ix_lgc_orders_state_tracked_at"},
              "lgc_outbox": {"ix_lgc_outbox_client_order_id"},
              "batch_files": {"ix_batch_files_file_name", "ix_batch_files_status", "ix_batch_files_received_at"},
              "lgc_results": {"ix_lgc_results_fetched_at", "ix_lgc_results_hl7_fetched_at"},
              "rupa_results": {"ix_rupa_results_stored_at"}}
    inspector = sa.inspect(engine)
    for table, names in wanted.items():
        built = {i["name"] for i in inspector.get_indexes(table)}
        declared = {i.name for i in lgc_orders.metadata.tables[table].indexes}
        assert names <= built, (table, names - built)
        assert names <= declared, (table, names - declared)


# ---- plans --------------------------------------------------------------------------------------

def _sweep_plans(engine, stale_before, dialect=None) -> list[list[str]]:
    due, undescribed, unconfirmed = lifecycle.open_orders_statements(
        stale_before=stale_before, dialect=dialect or engine.dialect.name)
    return [*(_plan(engine, stmt) for stmt in due), _plan(engine, undescribed), _plan(engine, unconfirmed)]


def test_the_sweep_reads_due_items_and_undescribed_orders_only(engine):
    _fill(engine)
    *due, undescribed, unconfirmed = _sweep_plans(engine, NOW - timedelta(hours=1))
    assert len(due) == 2  # checked before the window; never checked
    for plan in due:
        _assert_bounded(plan, "ix_lgc_order_items_open_checked")
    _assert_bounded(undescribed, "ix_lgc_orders_state_tracked_at")
    _assert_bounded(unconfirmed, "ix_lgc_orders_state")


def test_track_without_a_window_reads_the_open_items_not_the_finished_ones(engine):
    _fill(engine)
    *due, _, _ = _sweep_plans(engine, None)
    assert len(due) == 1
    _assert_bounded(due[0], "ix_lgc_order_items_open_checked")


def test_the_sweeps_due_items_are_a_range_of_the_partial_index(lite_engine):
    """On SQLite the plan says how the index is read: a range (SEARCH), not the whole index."""
    _fill(lite_engine)
    before, never, _, _ = _sweep_plans(lite_engine, NOW - timedelta(hours=1))
    assert before == ["SEARCH lgc_order_items USING INDEX ix_lgc_order_items_open_checked (last_checked_at<?)"]
    assert never == ["SEARCH lgc_order_items USING INDEX ix_lgc_order_items_open_checked (last_checked_at=?)"]


def test_track_of_a_batch_reads_that_batch(engine):
    _fill(engine)
    ledger_rows = sa.select(lgc_orders.c.client_order_id, lgc_orders.c.state).where(lgc_orders.c.batch_id.in_([3]))
    _assert_bounded(_plan(engine, ledger_rows), "ix_lgc_orders_batch_id")
    their_items = sa.select(lgc_order_items.c.status).where(lgc_order_items.c.client_order_id.in_(["H-000201"]))
    _assert_bounded(_plan(engine, their_items), "ix_lgc_order_items_client_order_id")


def test_the_results_candidates_skip_items_whose_results_are_stored(engine):
    _fill(engine)
    _assert_bounded(_plan(engine, candidates_query()), "ix_lgc_order_items_status_results_stored_at")


def test_finding_a_batch_by_name_or_id_uses_its_index(engine):
    _fill(engine)
    _assert_bounded(_plan(engine, ledger.find_batch_ids_query("hist-0003.csv")), "ix_batch_files_file_name")
    plan = _plan(engine, ledger.find_batch_ids_query("7"))
    assert uses_index(plan, "ix_batch_files_file_name") and full_scans(plan, HISTORY_TABLES) == [], plan


def test_a_batchs_counts_and_rows_read_that_batch(engine):
    _fill(engine)
    counts = (sa.select(lgc_outbox.c.outcome, sa.func.count()).where(lgc_outbox.c.batch_id.in_([4]))
              .group_by(lgc_outbox.c.outcome))
    _assert_bounded(_plan(engine, counts), "ix_lgc_outbox_batch_id_id")


def test_an_orders_outbox_rows_are_found_by_its_client_order_id(engine):
    _fill(engine)
    # etl.orders.outbox.confirm_accepted: an unconfirmed order confirmed by GET
    stmt = sa.select(lgc_outbox.c.id).where(lgc_outbox.c.client_order_id == "H-000123",
                                            lgc_outbox.c.body_sha256 == "0" * 64)
    _assert_bounded(_plan(engine, stmt), "ix_lgc_outbox_client_order_id")


def test_pending_webhook_events_are_read_by_state(engine):
    _fill(engine)
    stmt = (sa.select(webhook_events.c.id).where(
        webhook_events.c.source == "lgc",
        webhook_events.c.state.in_([WebhookEventState.RECEIVED, WebhookEventState.FAILED]))
        .order_by(webhook_events.c.id).limit(500))
    _assert_bounded(_plan(engine, stmt), "ix_webhook_events_source_state_id")


def test_what_a_results_run_stored_is_read_by_time(engine):
    stmt = sa.select(lgc_results.c.client_order_id).where(
        sa.or_(lgc_results.c.fetched_at >= NOW, lgc_results.c.hl7_fetched_at >= NOW))
    plan = _plan(engine, stmt)
    assert uses_index(plan, "ix_lgc_results_fetched_at") and uses_index(plan, "ix_lgc_results_hl7_fetched_at"), plan


def test_the_newest_batches_are_read_newest_first_by_key(engine):
    _fill(engine)
    plan = _plan(engine, records.recent_query(limit=20))
    if engine.dialect.name == "sqlite":  # the rowid, backwards, stopping at the limit
        assert plan == ["SCAN batch_files"], plan
    else:
        assert any("Index Scan Backward using pk_batch_files" in line for line in plan), plan


def test_the_batches_since_a_time_are_a_range_of_their_index(engine):
    _fill(engine)
    plan = _plan(engine, records.recent_query(limit=20, since=NOW - timedelta(days=1)))
    _assert_bounded(plan, "ix_batch_files_received_at")


def test_sqlite_after_analyze_still_reads_the_ledger_through_its_indexes(lite_engine):
    """ANALYZE keeps no histogram on SQLite: with every order `accepted` it takes `state =
    'unconfirmed'` for the whole ledger. The sweep names its ledger indexes (INDEXED BY)."""
    _fill(lite_engine)
    with lite_engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    *due, undescribed, unconfirmed = _sweep_plans(lite_engine, NOW - timedelta(hours=1), "sqlite")
    for plan in due:
        _assert_bounded(plan, "ix_lgc_order_items_open_checked")
    _assert_bounded(undescribed, "ix_lgc_orders_state_tracked_at")
    _assert_bounded(unconfirmed, "ix_lgc_orders_state")


# ---- the rows chosen are still the right ones -----------------------------------------------------

def _order(conn, coid: str, state: str = "accepted", *, tracked: bool = True, batch_id: int | None = None) -> None:
    conn.execute(sa.insert(lgc_orders).values(
        client_order_id=coid, batch_id=batch_id, state=state, attempts=1, payload_sha256="0" * 64, created_at=NOW,
        updated_at=NOW, tracked_at=NOW if tracked else None))


def _item(conn, coid: str, k: int, status: str | None, checked: datetime | None, **kw) -> None:
    conn.execute(sa.insert(lgc_order_items).values(
        item_id=f"{coid}-{k}", client_order_id=coid, status=status, first_seen_at=NOW, updated_at=NOW,
        last_checked_at=checked, **kw))


def test_the_sweep_chooses_due_open_orders_new_orders_and_unconfirmed_ones(engine):
    stale = NOW - timedelta(hours=1)
    with engine.begin() as conn:
        _order(conn, "DUE")  # an open item checked two hours ago
        _item(conn, "DUE", 1, "KitDispatched", NOW - timedelta(hours=2))
        _item(conn, "DUE", 2, "ResultsAvailable", NOW)
        _order(conn, "FRESH")  # checked a minute ago: not due
        _item(conn, "FRESH", 1, "KitRegistered", NOW - timedelta(minutes=1))
        _order(conn, "NEVER")  # an open item never checked (known from an event)
        _item(conn, "NEVER", 1, None, None)
        _order(conn, "DONE")  # every item final: never asked again
        _item(conn, "DONE", 1, "ResultsAvailable", NOW - timedelta(days=9))
        _item(conn, "DONE", 2, "Cancelled", NOW - timedelta(days=9))
        _order(conn, "NEW", tracked=False)  # accepted, no GET described it yet
        _order(conn, "ODD", "conflict", tracked=False)
        _order(conn, "UNC", "unconfirmed", tracked=False)
        _order(conn, "REJ", "rejected", tracked=False)
        _order(conn, "FAILED", "failed", tracked=False)
        _order(conn, "GONE", "rejected")  # items of an order the ledger no longer holds as placed
        _item(conn, "GONE", 1, "KitDispatched", NOW - timedelta(hours=5))
    assert lifecycle.open_orders(engine, stale_before=stale) == ["DUE", "NEVER", "NEW", "ODD", "UNC"]
    assert lifecycle.open_orders(engine) == ["DUE", "FRESH", "NEVER", "NEW", "ODD", "UNC"]
    assert lifecycle.open_orders(engine, stale_before=stale, limit=2) == ["DUE", "NEVER"]


def test_the_sweep_of_a_batch_chooses_that_batchs_orders(engine):
    with engine.begin() as conn:
        conn.execute(sa.insert(batch_files), [dict(id=b, file_name=f"b{b}.csv", sha256=f"{b:064d}", status="loaded",
                                                   received_at=NOW) for b in (1, 2)])
        _order(conn, "A-NEW", tracked=False, batch_id=1)
        _order(conn, "A-OPEN", batch_id=1)
        _item(conn, "A-OPEN", 1, "Created", NOW - timedelta(hours=3))
        _order(conn, "A-DONE", batch_id=1)
        _item(conn, "A-DONE", 1, "ResultsAvailable", NOW - timedelta(hours=3))
        _order(conn, "B-NEW", tracked=False, batch_id=2)
    assert lifecycle.open_orders(engine, batch_ids=[1]) == ["A-NEW", "A-OPEN"]
    assert lifecycle.open_orders(engine, batch_ids=[1], stale_before=NOW - timedelta(hours=4)) == ["A-NEW"]


def test_an_order_whose_items_a_get_listed_is_marked_once(engine):
    with engine.begin() as conn:
        _order(conn, "X", tracked=False)
        _order(conn, "Y", tracked=False)
    assert ledger.mark_tracked(engine, ["X", "X", "Z"], now=NOW) == 1
    assert ledger.mark_tracked(engine, ["X"], now=NOW + timedelta(hours=1)) == 0  # kept: the first answer
    assert lifecycle.open_orders(engine, stale_before=NOW) == ["Y"]


def test_track_marks_the_orders_it_described(engine, settings):
    """End to end on the sandbox: a loaded order is asked about by the sweep until a GET has
    listed its items; after that only its items' last check says when it is due again."""
    from etl.orders.load import load_rows
    from tests.helpers import seed_row

    row = {**seed_row(client_order_id="SCALE-1"), "line": 2}
    loaded = load_rows(engine, settings, [row])
    assert loaded.counts.get("accepted") == 1
    with engine.connect() as conn:
        assert conn.execute(sa.select(lgc_orders.c.tracked_at)).scalar_one() is None
    assert lifecycle.open_orders(engine, stale_before=NOW) == ["SCALE-1"]
    summary = lifecycle.track(engine, settings, stale_after=3600)
    assert summary.checked == 1
    with engine.connect() as conn:
        assert conn.execute(sa.select(lgc_orders.c.tracked_at)).scalar_one() is not None
    assert lifecycle.open_orders(engine, stale_before=datetime.now(UTC) - timedelta(hours=1)) == []


def test_results_stored_whole_leave_the_candidates(engine):
    from etl.orders.results import add_hl7, store_result

    with engine.begin() as conn:
        _order(conn, "R")
        _item(conn, "R", 1, "ResultsAvailable", NOW, barcode="BC1")
        _item(conn, "R", 2, "ResultsAvailable", NOW, barcode="BC2")
        _item(conn, "R", 3, "ResultsAvailable", NOW, barcode="BC3", results_stored_at=NOW)  # done long ago
    due = {c.barcode: c for c in candidates(engine)}
    assert sorted(due) == ["BC1", "BC2"]
    document = b'{"testResults": []}'
    store_result(engine, due["BC1"], document, b"MSH|^~\\&|")  # both documents at once
    store_result(engine, due["BC2"], document, None)  # the HL7 not released yet: still a candidate
    again = {c.barcode: c for c in candidates(engine)}
    assert sorted(again) == ["BC2"] and again["BC2"].has_json
    assert add_hl7(engine, "BC2", b"MSH|^~\\&|")
    assert candidates(engine) == []
    with engine.connect() as conn:
        marked = dict(conn.execute(sa.select(lgc_order_items.c.barcode, lgc_order_items.c.results_stored_at)).all())
    assert all(marked[b] is not None for b in ("BC1", "BC2", "BC3"))


def test_a_batch_is_found_by_name_id_or_the_base_name_of_a_path(engine):
    with engine.begin() as conn:
        conn.execute(sa.insert(batch_files), [
            dict(id=1, file_name="orders.csv", sha256="1" * 64, status="loaded", received_at=NOW),
            dict(id=2, file_name="orders.csv", sha256="2" * 64, status="loaded", received_at=NOW),
            dict(id=3, file_name="more/rows.csv", sha256="3" * 64, status="loaded", received_at=NOW),
            dict(id=12, file_name="12", sha256="4" * 64, status="loaded", received_at=NOW),
        ])
    assert ledger.find_batch_ids(engine, "orders.csv") == [1, 2]
    assert ledger.find_batch_ids(engine, "3") == [3]
    assert ledger.find_batch_ids(engine, "12") == [12]
    assert ledger.find_batch_ids(engine, "rows.csv") == [3]  # the base name of a stored path
    assert ledger.find_batch_ids(engine, "more/rows.csv") == [3]
    assert ledger.find_batch_ids(engine, "nothing.csv") == []


def test_batches_page_newest_first_with_limit_and_since(engine):
    with engine.begin() as conn:
        conn.execute(sa.insert(batch_files), [
            dict(id=b, file_name=f"b{b}.csv", sha256=f"{b:064d}", status="loaded",
                 received_at=NOW - timedelta(days=10 - b)) for b in range(1, 11)])
    assert [b["id"] for b in records.recent(engine, limit=3)] == [10, 9, 8]
    assert [b["id"] for b in records.recent(engine, limit=None, since=NOW - timedelta(days=2, hours=1))] == [10, 9, 8]
    assert [b["id"] for b in records.recent(engine, limit=2, since=NOW - timedelta(days=5, hours=1))] == [10, 9]
    assert len(records.recent(engine, limit=None)) == 10


# ---- the migration fills the new columns from what the warehouse already holds --------------------

@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def at_0012(request, tmp_path):
    """A warehouse at 0012_phi_access (before issue 27): its engine."""
    from etl import warehouse
    from tests.pgserver import create_database

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.db'}"
    else:
        url = create_database(request.getfixturevalue("pg_admin_url"))
    eng = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    warehouse.upgrade(eng, "0012_phi_access")
    yield eng
    eng.dispose()


def test_the_migration_marks_described_orders_and_complete_results(at_0012):
    from etl import warehouse

    old = NOW - timedelta(days=30)
    with at_0012.begin() as conn:
        for coid in ("SEEN", "UNSEEN"):
            conn.execute(sa.text(
                "INSERT INTO lgc_orders (client_order_id, state, attempts, payload_sha256, created_at, updated_at) "
                "VALUES (:c, 'accepted', 1, :s, :t, :t)"), {"c": coid, "s": "0" * 64, "t": old})
        for item, barcode, status in (("I1", "B1", "ResultsAvailable"), ("I2", "B2", "ResultsAvailable"),
                                      ("I3", None, "KitDispatched")):
            conn.execute(sa.text(
                "INSERT INTO lgc_order_items (item_id, client_order_id, status, barcode, first_seen_at, updated_at) "
                "VALUES (:i, 'SEEN', :st, :b, :t, :t)"), {"i": item, "st": status, "b": barcode, "t": old})
        for barcode, hl7 in (("B1", b"MSH|"), ("B2", None)):  # B2's HL7 not released yet
            conn.execute(sa.text(
                "INSERT INTO lgc_results (barcode, item_id, client_order_id, json_body, json_sha256, hl7_body, "
                "fetched_at, value_count) VALUES (:b, 'I1', 'SEEN', :j, :s, :h, :t, 0)"),
                {"b": barcode, "j": b"{}", "s": "0" * 64, "h": hl7, "t": old})
    warehouse.upgrade(at_0012, "0013_scale_indexes")
    with at_0012.connect() as conn:
        tracked = dict(conn.execute(sa.text("SELECT client_order_id, tracked_at FROM lgc_orders")).all())
        stored = dict(conn.execute(sa.text("SELECT item_id, results_stored_at FROM lgc_order_items")).all())
    assert tracked["SEEN"] is not None and tracked["UNSEEN"] is None
    assert stored["I1"] is not None and stored["I2"] is None and stored["I3"] is None
