"""vendor_budget, vendor_budget_leases: one rate limit and concurrency limit for all loaders

Revision ID: 0005_budget
Revises: 0004_outbox
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_budget"
down_revision = "0004_outbox"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vendor_budget",
        sa.Column("vendor", sa.String(length=200), nullable=False),
        sa.Column("next_slot", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("vendor", name=op.f("pk_vendor_budget")),
    )
    op.create_table(
        "vendor_budget_leases",
        sa.Column("vendor", sa.String(length=200), nullable=False),
        sa.Column("holder", sa.String(length=200), nullable=False),
        sa.Column("want", sa.Integer(), nullable=False),
        sa.Column("held", sa.Integer(), nullable=False),
        sa.Column("lease_until", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("vendor", "holder", name=op.f("pk_vendor_budget_leases")),
    )


def downgrade() -> None:
    op.drop_table("vendor_budget_leases")
    op.drop_table("vendor_budget")
