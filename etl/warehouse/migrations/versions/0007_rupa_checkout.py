"""Rupa Checkout: rupa_order_intents (the intents ledger), rupa_orders, rupa_ordered_tests,
rupa_results

Revision ID: 0007_rupa_checkout
Revises: 0005_budget
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007_rupa_checkout"
down_revision = "0005_budget"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "rupa_order_intents",
        sa.Column("row_id", sa.String(length=100), nullable=False),
        sa.Column("batch_id", Id, nullable=True),
        sa.Column("line", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("patient_id", sa.String(length=100), nullable=True),
        sa.Column("lab_test_ids", JSONType, nullable=True),
        sa.Column("return_url", sa.Text(), nullable=True),
        sa.Column("meta", JSONType, nullable=True),
        sa.Column("order_intent_id", sa.String(length=100), nullable=True),
        sa.Column("checkout_url", sa.Text(), nullable=True),
        sa.Column("order_id", sa.String(length=100), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("resends", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("payload_sha256", sa.String(length=64), nullable=False),
        sa.Column("claimed_by", sa.String(length=100), nullable=True),
        sa.Column("claimed_until", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["batch_id"], ["batch_files.id"], ondelete="SET NULL",
                                name=op.f("fk_rupa_order_intents_batch_id_batch_files")),
        sa.PrimaryKeyConstraint("row_id", name=op.f("pk_rupa_order_intents")),
    )
    op.create_index("ix_rupa_order_intents_batch_id", "rupa_order_intents", ["batch_id"])
    op.create_index("ix_rupa_order_intents_order_intent_id", "rupa_order_intents", ["order_intent_id"])

    op.create_table(
        "rupa_orders",
        sa.Column("id", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=100), nullable=True),
        sa.Column("patient_id", sa.String(length=100), nullable=True),
        sa.Column("order_intent_id", sa.String(length=100), nullable=True),
        sa.Column("date_submitted", TS, nullable=True),
        sa.Column("date_paid", TS, nullable=True),
        sa.Column("date_completed", TS, nullable=True),
        sa.Column("date_canceled", TS, nullable=True),
        sa.Column("payer", sa.String(length=100), nullable=True),
        sa.Column("total_price", sa.String(length=40), nullable=True),
        sa.Column("attributes", JSONType, nullable=True),
        sa.Column("relationships", JSONType, nullable=True),
        sa.Column("event_created_at", TS, nullable=False),
        sa.Column("first_seen_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rupa_orders")),
    )
    op.create_index("ix_rupa_orders_order_intent_id", "rupa_orders", ["order_intent_id"])

    op.create_table(
        "rupa_ordered_tests",
        sa.Column("id", sa.String(length=100), nullable=False),
        sa.Column("order_id", sa.String(length=100), nullable=False),
        sa.Column("lab_test_id", sa.String(length=100), nullable=True),
        sa.Column("date_results_received_from_lab", TS, nullable=True),
        sa.Column("attributes", JSONType, nullable=True),
        sa.Column("relationships", JSONType, nullable=True),
        sa.Column("results_pdf_url", sa.Text(), nullable=True),
        sa.Column("results_hl7_url", sa.Text(), nullable=True),
        sa.Column("results_pending", sa.Integer(), nullable=False),
        sa.Column("results_attempts", sa.Integer(), nullable=False),
        sa.Column("results_error", sa.Text(), nullable=True),
        sa.Column("event_created_at", TS, nullable=False),
        sa.Column("first_seen_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rupa_ordered_tests")),
    )
    op.create_index("ix_rupa_ordered_tests_order_id", "rupa_ordered_tests", ["order_id"])
    op.create_index("ix_rupa_ordered_tests_results_pending", "rupa_ordered_tests", ["results_pending"])

    op.create_table(
        "rupa_results",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("ordered_test_id", sa.String(length=100), nullable=False),
        sa.Column("order_id", sa.String(length=100), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("content_type", sa.String(length=100), nullable=True),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("stored_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rupa_results")),
        sa.UniqueConstraint("ordered_test_id", "kind", "sha256",
                            name=op.f("uq_rupa_results_ordered_test_id_kind_sha256")),
    )
    op.create_index("ix_rupa_results_order_id", "rupa_results", ["order_id"])


def downgrade() -> None:
    op.drop_index("ix_rupa_results_order_id", table_name="rupa_results")
    op.drop_table("rupa_results")
    op.drop_index("ix_rupa_ordered_tests_results_pending", table_name="rupa_ordered_tests")
    op.drop_index("ix_rupa_ordered_tests_order_id", table_name="rupa_ordered_tests")
    op.drop_table("rupa_ordered_tests")
    op.drop_index("ix_rupa_orders_order_intent_id", table_name="rupa_orders")
    op.drop_table("rupa_orders")
    op.drop_index("ix_rupa_order_intents_order_intent_id", table_name="rupa_order_intents")
    op.drop_index("ix_rupa_order_intents_batch_id", table_name="rupa_order_intents")
    op.drop_table("rupa_order_intents")
