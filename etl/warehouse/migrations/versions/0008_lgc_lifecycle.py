"""LetsGetChecked after the PUT: order items, their status history, results and result values

Revision ID: 0008_lgc_lifecycle
Revises: 0003_webhooks
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_lgc_lifecycle"
down_revision = "0007_rupa_checkout"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "lgc_order_items",
        sa.Column("item_id", sa.String(length=100), nullable=False),
        sa.Column("client_order_id", sa.String(length=100), nullable=False),
        sa.Column("code", sa.String(length=100), nullable=True),
        sa.Column("status", sa.String(length=40), nullable=True),
        sa.Column("status_at", TS, nullable=True),
        sa.Column("status_source", sa.String(length=20), nullable=True),
        sa.Column("barcode", sa.String(length=50), nullable=True),
        sa.Column("alpha_code", sa.String(length=20), nullable=True),
        sa.Column("outbound_tracking", sa.String(length=100), nullable=True),
        sa.Column("inbound_tracking", sa.String(length=100), nullable=True),
        sa.Column("replacement_item_id", sa.String(length=100), nullable=True),
        sa.Column("vendor_created_at", TS, nullable=True),
        sa.Column("vendor_updated_at", TS, nullable=True),
        sa.Column("first_seen_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("last_checked_at", TS, nullable=True),
        sa.Column("cancel_state", sa.String(length=20), nullable=True),
        sa.Column("cancel_requested_at", TS, nullable=True),
        sa.Column("cancel_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("item_id", name=op.f("pk_lgc_order_items")),
    )
    op.create_index("ix_lgc_order_items_client_order_id", "lgc_order_items", ["client_order_id"])
    op.create_index("ix_lgc_order_items_status", "lgc_order_items", ["status"])
    op.create_index("ix_lgc_order_items_barcode", "lgc_order_items", ["barcode"])

    op.create_table(
        "lgc_item_status_history",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("item_id", sa.String(length=100), nullable=False),
        sa.Column("client_order_id", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=40), nullable=False),
        sa.Column("previous_status", sa.String(length=40), nullable=True),
        sa.Column("source", sa.String(length=20), nullable=False),
        sa.Column("vendor_timestamp", TS, nullable=True),
        sa.Column("applied", sa.Boolean(), nullable=False),
        sa.Column("webhook_event_id", Id, nullable=True),
        sa.Column("recorded_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lgc_item_status_history")),
    )
    op.create_index("ix_lgc_item_status_history_item_id_id", "lgc_item_status_history", ["item_id", "id"])

    op.create_table(
        "lgc_results",
        sa.Column("barcode", sa.String(length=50), nullable=False),
        sa.Column("item_id", sa.String(length=100), nullable=False),
        sa.Column("client_order_id", sa.String(length=100), nullable=False),
        sa.Column("alpha_code", sa.String(length=20), nullable=True),
        sa.Column("json_body", sa.LargeBinary(), nullable=False),
        sa.Column("json_sha256", sa.String(length=64), nullable=False),
        sa.Column("hl7_body", sa.LargeBinary(), nullable=True),
        sa.Column("hl7_sha256", sa.String(length=64), nullable=True),
        sa.Column("fetched_at", TS, nullable=False),
        sa.Column("hl7_fetched_at", TS, nullable=True),
        sa.Column("value_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("barcode", name=op.f("pk_lgc_results")),
    )
    op.create_index("ix_lgc_results_item_id", "lgc_results", ["item_id"])

    op.create_table(
        "lgc_result_values",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("barcode", sa.String(length=50), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("biomarker_name", sa.Text(), nullable=True),
        sa.Column("test_code", sa.String(length=100), nullable=True),
        sa.Column("kind", sa.String(length=40), nullable=True),
        sa.Column("descriptor", sa.String(length=100), nullable=True),
        sa.Column("value", sa.Text(), nullable=True),
        sa.Column("numeric_value", sa.Float(), nullable=True),
        sa.Column("unit", sa.String(length=50), nullable=True),
        sa.Column("lower_bound", sa.String(length=50), nullable=True),
        sa.Column("upper_bound", sa.String(length=50), nullable=True),
        sa.Column("loinc", sa.String(length=20), nullable=True),
        sa.Column("headline", sa.Text(), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["barcode"], ["lgc_results.barcode"], ondelete="CASCADE",
                                name=op.f("fk_lgc_result_values_barcode_lgc_results")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lgc_result_values")),
        sa.UniqueConstraint("barcode", "position", name=op.f("uq_lgc_result_values_barcode_position")),
    )


def downgrade() -> None:
    op.drop_table("lgc_result_values")
    op.drop_index("ix_lgc_results_item_id", table_name="lgc_results")
    op.drop_table("lgc_results")
    op.drop_index("ix_lgc_item_status_history_item_id_id", table_name="lgc_item_status_history")
    op.drop_table("lgc_item_status_history")
    op.drop_index("ix_lgc_order_items_barcode", table_name="lgc_order_items")
    op.drop_index("ix_lgc_order_items_status", table_name="lgc_order_items")
    op.drop_index("ix_lgc_order_items_client_order_id", table_name="lgc_order_items")
    op.drop_table("lgc_order_items")
