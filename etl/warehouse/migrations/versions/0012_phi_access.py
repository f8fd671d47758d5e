"""phi_access: the audit trail of who saw or wrote PHI (etl.audit), append-only.

Revision ID: 0012_phi_access
Revises: 0011_event_auth
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0012_phi_access"
down_revision = "0011_event_auth"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)
JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "phi_access",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("actor", sa.String(length=300), nullable=False),
        sa.Column("action", sa.String(length=40), nullable=False),
        sa.Column("subject_kind", sa.String(length=40), nullable=False),
        sa.Column("subject_ids", JSONType, nullable=False),
        sa.Column("record_count", sa.Integer(), nullable=False),
        sa.Column("detail", sa.String(length=500), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_phi_access")),
    )
    op.create_index("ix_phi_access_at", "phi_access", ["at"])
    op.create_index("ix_phi_access_actor", "phi_access", ["actor"])


def downgrade() -> None:
    op.drop_index("ix_phi_access_actor", table_name="phi_access")
    op.drop_index("ix_phi_access_at", table_name="phi_access")
    op.drop_table("phi_access")
