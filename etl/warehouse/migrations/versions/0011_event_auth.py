"""webhook_events.authenticated: whether the delivery proved it came from the vendor (a valid
signature, or the receiver's capability path). An unauthenticated event is only a hint: it can
make labsync ask the vendor's own API, never write what its body says (etl.orders.lifecycle,
etl.checkout.events). Rows stored before this revision count as unauthenticated.

Revision ID: 0011_event_auth
Revises: 0010_excel_rows
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_event_auth"
down_revision = "0010_excel_rows"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("webhook_events", sa.Column("authenticated", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("webhook_events") as batch:
        batch.drop_column("authenticated")
