"""the order outbox (PUT bodies in the warehouse) and file claims owned by runs

- lgc_outbox: one row per valid CSV row of a batch: its exact PUT body (deleted once settled),
  the body's sha256, this row's own outcome and attempts across runs.
- batch_files: claimed_by / claimed_until (who processes the file, with a lease) and stored_as
  (where the file ended up), so the warehouse, not a rename, decides who owns a file.
- lgc_orders: an index on claimed_by, for the heartbeat that renews one owner's claims.

Revision ID: 0004_outbox
Revises: 0003_webhooks
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_outbox"
down_revision = "0003_webhooks"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "lgc_outbox",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("batch_id", Id, nullable=False),
        sa.Column("line", sa.Integer(), nullable=True),
        sa.Column("client_order_id", sa.String(length=100), nullable=False),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column("body_sha256", sa.String(length=64), nullable=False),
        sa.Column("outcome", sa.String(length=20), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["batch_id"], ["batch_files.id"], ondelete="CASCADE",
                                name=op.f("fk_lgc_outbox_batch_id_batch_files")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lgc_outbox")),
        sa.UniqueConstraint("batch_id", "client_order_id",
                            name=op.f("uq_lgc_outbox_batch_id_client_order_id")),
    )
    op.create_index("ix_lgc_outbox_batch_id_id", "lgc_outbox", ["batch_id", "id"])
    op.create_index("ix_lgc_outbox_outcome", "lgc_outbox", ["outcome"])
    with op.batch_alter_table("batch_files", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("claimed_until", TS, nullable=True))
        batch_op.add_column(sa.Column("stored_as", sa.String(length=1000), nullable=True))
    op.create_index("ix_lgc_orders_claimed_by", "lgc_orders", ["claimed_by"])


def downgrade() -> None:
    op.drop_index("ix_lgc_orders_claimed_by", table_name="lgc_orders")
    with op.batch_alter_table("batch_files", schema=None) as batch_op:
        batch_op.drop_column("stored_as")
        batch_op.drop_column("claimed_until")
        batch_op.drop_column("claimed_by")
    op.drop_index("ix_lgc_outbox_outcome", table_name="lgc_outbox")
    op.drop_index("ix_lgc_outbox_batch_id_id", table_name="lgc_outbox")
    op.drop_table("lgc_outbox")
