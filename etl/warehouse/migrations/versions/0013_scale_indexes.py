"""indexes that bound every per-batch and per-run statement to its own work (issue 27)

Revision ID: 0013_scale_indexes
Revises: 0012_phi_access

A warehouse that has run for years holds millions of ledger, outbox and item-history rows; the
statements a batch or a lifecycle run makes must read their own rows only:

- the sweep's choice of what to GET (etl.orders.lifecycle.open_orders): open items by when they
  were last checked (a partial index holding open items only), and orders never answered by a
  GET through `lgc_orders.tracked_at` (new: set once a GET listed the order's items; backfilled
  here from the items already held) with an index on (state, tracked_at);
- the results candidates (etl.orders.results.candidates): `lgc_order_items.results_stored_at`
  (new: set once both documents are stored; backfilled here) with an index on (status,
  results_stored_at), so items whose results are done are never read again;
- `--batch NAME` lookups (batch_files.file_name), `labsync batches --since` (received_at),
  batches by status (retry), outbox rows by
  clientOrderId (an unconfirmed order confirmed by GET), and what a run stored since it started
  (the audit of results: lgc_results.fetched_at / hl7_fetched_at, rupa_results.stored_at).

Plain CREATE INDEX: the upgrade runs in one transaction under the migration lock
(etl.warehouse.upgrade), where PostgreSQL refuses CREATE INDEX CONCURRENTLY. On a large
PostgreSQL warehouse the README shows how to build them CONCURRENTLY first; `if_not_exists`
makes this migration keep those.
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0013_scale_indexes"
down_revision = "0012_phi_access"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)

# the open items (etl.states.FINAL_ITEM_STATUSES excluded), as etl.warehouse.tables.OPEN_ITEM_SQL
OPEN_ITEM_SQL = "status IS NULL OR status NOT IN ('Cancelled', 'NotListed', 'ResultsAvailable', 'ValidationFailed')"

INDEXES = [
    # (name, table, columns, partial predicate)
    ("ix_lgc_order_items_open_checked", "lgc_order_items", ["last_checked_at", "client_order_id"], OPEN_ITEM_SQL),
    ("ix_lgc_order_items_status_results_stored_at", "lgc_order_items", ["status", "results_stored_at"], None),
    ("ix_lgc_orders_state_tracked_at", "lgc_orders", ["state", "tracked_at"], None),
    ("ix_lgc_outbox_client_order_id", "lgc_outbox", ["client_order_id"], None),
    ("ix_batch_files_file_name", "batch_files", ["file_name"], None),
    ("ix_batch_files_status", "batch_files", ["status"], None),
    ("ix_batch_files_received_at", "batch_files", ["received_at"], None),
    ("ix_lgc_results_fetched_at", "lgc_results", ["fetched_at"], None),
    ("ix_lgc_results_hl7_fetched_at", "lgc_results", ["hl7_fetched_at"], None),
    ("ix_rupa_results_stored_at", "rupa_results", ["stored_at"], None),
]


def upgrade() -> None:
    op.add_column("lgc_orders", sa.Column("tracked_at", TS, nullable=True))
    op.add_column("lgc_order_items", sa.Column("results_stored_at", TS, nullable=True))
    # backfill: orders a GET already answered (their items are held), results already complete
    op.execute(
        "UPDATE lgc_orders SET tracked_at = updated_at WHERE tracked_at IS NULL AND EXISTS "
        "(SELECT 1 FROM lgc_order_items i WHERE i.client_order_id = lgc_orders.client_order_id)"
    )
    op.execute(
        "UPDATE lgc_order_items SET results_stored_at = updated_at WHERE results_stored_at IS NULL "
        "AND status = 'ResultsAvailable' AND EXISTS (SELECT 1 FROM lgc_results r "
        "WHERE r.barcode = lgc_order_items.barcode AND r.hl7_body IS NOT NULL)"
    )
    for name, table, columns, where in INDEXES:
        extra: dict[str, Any] = {} if where is None else {"sqlite_where": sa.text(where), "postgresql_where": sa.text(where)}
        op.create_index(name, table, columns, if_not_exists=True, **extra)


def downgrade() -> None:
    for name, table, _columns, _where in reversed(INDEXES):
        op.drop_index(name, table_name=table, if_exists=True)
    with op.batch_alter_table("lgc_order_items") as batch:
        batch.drop_column("results_stored_at")
    with op.batch_alter_table("lgc_orders") as batch:
        batch.drop_column("tracked_at")
