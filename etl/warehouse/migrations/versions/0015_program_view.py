"""the program's views and outreach letters (issue 25)

Revision ID: 0015_program_view
Revises: 0014_lab_observations

Tables: `lgc_order_programs` (clientOrderId -> programCode, participant id) and
`lgc_outreach_letters` (results letters from LetsGetChecked's Outreach API).

Views (the same columns and meaning on SQLite and PostgreSQL; only the seconds between two
timestamps is spelled per dialect):
- `lgc_item_stages`: one row per order item: its program, batch, current stage and the vendor's
  timestamp of each stage (the first time the item was seen in it);
- `lgc_program_funnel`: per program and batch, how many items reached each stage;
- `lgc_stage_turnaround`: one row per item and stage it completed: from, to, seconds.
"""

import sqlalchemy as sa
from alembic import op

revision = "0015_program_view"
down_revision = "0014_lab_observations"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# current status -> stage (docs/warehouse.md); NULL/Submitted: sent
STAGE_CASE = """CASE
    WHEN i.status = 'Created' THEN 'accepted'
    WHEN i.status = 'KitDispatched' THEN 'kit_dispatched'
    WHEN i.status = 'KitRegistered' THEN 'registered'
    WHEN i.status = 'KitArrivedAtLab' THEN 'at_lab'
    WHEN i.status = 'ResultsAvailable' THEN 'results_available'
    WHEN i.status = 'Cancelled' THEN 'cancelled'
    WHEN i.status IN ('ValidationFailed', 'NotListed') THEN 'failed'
    ELSE 'sent' END"""
RANK_CASE = """CASE s.stage WHEN 'accepted' THEN 1 WHEN 'kit_dispatched' THEN 2 WHEN 'registered' THEN 3
    WHEN 'at_lab' THEN 4 WHEN 'results_available' THEN 5 ELSE 0 END"""

ITEM_STAGES = f"""CREATE VIEW lgc_item_stages AS
SELECT i.item_id, i.client_order_id, i.code, p.program_code, p.participant_id, o.batch_id,
    i.status AS current_status, {STAGE_CASE} AS stage,
    i.status_at AS stage_since, i.barcode,
    COALESCE(i.vendor_created_at, o.created_at) AS sent_at,
    h.accepted_at, h.kit_dispatched_at, h.registered_at, h.at_lab_at, h.results_available_at,
    h.cancelled_at, h.failed_at
FROM lgc_order_items i
LEFT JOIN lgc_orders o ON o.client_order_id = i.client_order_id
LEFT JOIN lgc_order_programs p ON p.client_order_id = i.client_order_id
LEFT JOIN (
    SELECT item_id,
        MIN(CASE WHEN status = 'Created' THEN vendor_timestamp END) AS accepted_at,
        MIN(CASE WHEN status = 'KitDispatched' THEN vendor_timestamp END) AS kit_dispatched_at,
        MIN(CASE WHEN status = 'KitRegistered' THEN vendor_timestamp END) AS registered_at,
        MIN(CASE WHEN status = 'KitArrivedAtLab' THEN vendor_timestamp END) AS at_lab_at,
        MIN(CASE WHEN status = 'ResultsAvailable' THEN vendor_timestamp END) AS results_available_at,
        MIN(CASE WHEN status = 'Cancelled' THEN vendor_timestamp END) AS cancelled_at,
        MIN(CASE WHEN status IN ('ValidationFailed', 'NotListed') THEN vendor_timestamp END) AS failed_at
    FROM lgc_item_status_history GROUP BY item_id
) h ON h.item_id = i.item_id"""


def _reached(rank: int, column: str) -> str:
    return f"SUM(CASE WHEN s.{column} IS NOT NULL OR {RANK_CASE} >= {rank} THEN 1 ELSE 0 END)"


FUNNEL = f"""CREATE VIEW lgc_program_funnel AS
SELECT s.program_code, s.batch_id,
    COUNT(*) AS sent,
    {_reached(1, 'accepted_at')} AS accepted,
    {_reached(2, 'kit_dispatched_at')} AS kit_dispatched,
    {_reached(3, 'registered_at')} AS registered,
    {_reached(4, 'at_lab_at')} AS at_lab,
    {_reached(5, 'results_available_at')} AS results_available,
    SUM(CASE WHEN s.stage = 'cancelled' THEN 1 ELSE 0 END) AS cancelled,
    SUM(CASE WHEN s.stage = 'failed' THEN 1 ELSE 0 END) AS failed
FROM lgc_item_stages s
GROUP BY s.program_code, s.batch_id"""

# (stage, from column, to column): the time an item spent getting to `stage`
STEPS = (
    ("accepted", "sent_at", "accepted_at"),
    ("kit_dispatched", "accepted_at", "kit_dispatched_at"),
    ("registered", "kit_dispatched_at", "registered_at"),
    ("at_lab", "registered_at", "at_lab_at"),
    ("results_available", "at_lab_at", "results_available_at"),
    ("sent_to_results", "sent_at", "results_available_at"),
)


def _seconds(dialect: str, a: str, b: str) -> str:
    if dialect == "postgresql":
        return f"EXTRACT(EPOCH FROM ({b} - {a}))"
    return f"((julianday({b}) - julianday({a})) * 86400.0)"


def _turnaround(dialect: str) -> str:
    parts = [
        f"SELECT s.item_id, s.client_order_id, s.program_code, s.batch_id, '{stage}' AS stage, "
        f"s.{a} AS started_at, s.{b} AS ended_at, {_seconds(dialect, 's.' + a, 's.' + b)} AS seconds "
        f"FROM lgc_item_stages s WHERE s.{a} IS NOT NULL AND s.{b} IS NOT NULL"
        for stage, a, b in STEPS
    ]
    return "CREATE VIEW lgc_stage_turnaround AS\n" + "\nUNION ALL\n".join(parts)


VIEWS = ("lgc_stage_turnaround", "lgc_program_funnel", "lgc_item_stages")


def upgrade() -> None:
    op.create_table(
        "lgc_order_programs",
        sa.Column("client_order_id", sa.String(100), nullable=False),
        sa.Column("program_code", sa.String(200)),
        sa.Column("participant_id", sa.String(200)),
        sa.Column("batch_id", Id),
        sa.Column("recorded_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("client_order_id", name="pk_lgc_order_programs"),
    )
    op.create_index("ix_lgc_order_programs_program_code", "lgc_order_programs", ["program_code"])
    op.create_table(
        "lgc_outreach_letters",
        sa.Column("letter_id", sa.String(120), nullable=False),
        sa.Column("barcode", sa.String(50), nullable=False),
        sa.Column("audience", sa.String(20), nullable=False),
        sa.Column("letter_type", sa.String(40), nullable=False),
        sa.Column("status", sa.String(40)),
        sa.Column("failure_reason", sa.Text()),
        sa.Column("notified_at", TS),
        sa.Column("item_id", sa.String(100)),
        sa.Column("client_order_id", sa.String(100)),
        sa.Column("pdf", sa.LargeBinary()),
        sa.Column("pdf_sha256", sa.String(64)),
        sa.Column("pdf_size", sa.Integer()),
        sa.Column("pdf_fetched_at", TS),
        sa.Column("feed_event_id", sa.BigInteger()),
        sa.Column("first_seen_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("letter_id", name="pk_lgc_outreach_letters"),
    )
    op.create_index("ix_lgc_outreach_letters_barcode", "lgc_outreach_letters", ["barcode"])
    op.create_index("ix_lgc_outreach_letters_client_order_id", "lgc_outreach_letters", ["client_order_id"])
    dialect = op.get_bind().dialect.name
    op.execute(ITEM_STAGES)
    op.execute(FUNNEL)
    op.execute(_turnaround(dialect))


def downgrade() -> None:
    for view in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {view}")
    op.drop_index("ix_lgc_outreach_letters_client_order_id", table_name="lgc_outreach_letters")
    op.drop_index("ix_lgc_outreach_letters_barcode", table_name="lgc_outreach_letters")
    op.drop_table("lgc_outreach_letters")
    op.drop_index("ix_lgc_order_programs_program_code", table_name="lgc_order_programs")
    op.drop_table("lgc_order_programs")
