"""An inbox on object storage: the move a batch file is in the middle of (copy, then delete)

Revision ID: 0009_inbox_moves
Revises: 0008_lgc_lifecycle
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_inbox_moves"
down_revision = "0008_lgc_lifecycle"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batch_files") as batch:
        batch.add_column(sa.Column("moving_from", sa.String(length=1000), nullable=True))
        batch.add_column(sa.Column("moving_to", sa.String(length=1000), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batch_files") as batch:
        batch.drop_column("moving_to")
        batch.drop_column("moving_from")
