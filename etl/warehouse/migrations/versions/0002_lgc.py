"""lgc_orders: claim columns so concurrent loaders never send the same order at once

Revision ID: 0002_lgc
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_lgc"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("lgc_orders", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("lgc_orders", schema=None) as batch_op:
        batch_op.drop_column("claimed_until")
        batch_op.drop_column("claimed_by")
