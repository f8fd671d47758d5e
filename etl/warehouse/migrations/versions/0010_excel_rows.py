"""rejected_rows.excel_row: the row a spreadsheet shows for a rejected record (header = row 1),
beside `line`, the file's physical line (they differ after a quoted cell that spans lines)

Revision ID: 0010_excel_rows
Revises: 0008_lgc_lifecycle
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_excel_rows"
down_revision = "0009_inbox_moves"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("rejected_rows", sa.Column("excel_row", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rejected_rows") as batch:
        batch.drop_column("excel_row")
