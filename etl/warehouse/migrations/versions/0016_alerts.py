"""alerts: what fired, when, where it was sent, and when it cleared (issue 24)

Revision ID: 0016_alerts
Revises: 0015_program_view
"""

import sqlalchemy as sa
from alembic import op

revision = "0016_alerts"
down_revision = "0015_program_view"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
OPEN = "resolved_at IS NULL"


def upgrade() -> None:
    # one row per episode of a condition (etl.alerts is the only writer): opened when it first
    # fires, folded while it persists or repeats, closed when it clears. PHI-free text only.
    op.create_table(
        "alerts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("condition_key", sa.String(300), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("link", sa.String(1000)),
        sa.Column("first_seen", TS, nullable=False),
        sa.Column("last_seen", TS, nullable=False),
        sa.Column("repeats", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("sent_at", TS),
        sa.Column("sent_to", sa.String(1000)),
        sa.Column("send_error", sa.String(1000)),
        sa.Column("resolved_at", TS),
        sa.Column("resolved_sent_at", TS),
    )
    op.create_index("ix_alerts_condition_key_resolved_at", "alerts", ["condition_key", "resolved_at"])
    # at most one open episode per condition: two processes that see it at once send it once
    op.create_index("uq_alerts_open_condition", "alerts", ["condition_key"], unique=True,
                    sqlite_where=sa.text(OPEN), postgresql_where=sa.text(OPEN))


def downgrade() -> None:
    op.drop_index("uq_alerts_open_condition", table_name="alerts")
    op.drop_index("ix_alerts_condition_key_resolved_at", table_name="alerts")
    op.drop_table("alerts")
