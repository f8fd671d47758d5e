"""one observations table across both vendors (issue 26)

Revision ID: 0014_lab_observations
Revises: 0013_scale_indexes

`lab_observations`: one row per version of a lab observation, from LetsGetChecked's results
(JSON and HL7 2.3) and Rupa's HL7 (2.5.1), written by etl.results.observations; `fhir_exports`:
the FHIR export's watermark per target (etl.results.fhir).
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0014_lab_observations"
down_revision = "0013_scale_indexes"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSONType = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "lab_observations",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("vendor", sa.String(20), nullable=False),
        sa.Column("order_id", sa.String(100), nullable=False),
        sa.Column("item_id", sa.String(100), nullable=False),
        sa.Column("ordered_test", sa.String(200)),
        sa.Column("patient_id", sa.String(100)),
        sa.Column("result_key", sa.String(200), nullable=False),
        sa.Column("obs_key", sa.String(300), nullable=False),
        sa.Column("code", sa.String(100)),
        sa.Column("code_system", sa.String(200)),
        sa.Column("name", sa.Text),
        sa.Column("value", sa.Text),
        sa.Column("value_type", sa.String(10)),
        sa.Column("numeric_value", sa.Float),
        sa.Column("unit", sa.String(50)),
        sa.Column("reference_range", sa.String(200)),
        sa.Column("abnormal_flags", sa.String(100)),
        sa.Column("interpretation", sa.String(10), nullable=False),
        sa.Column("status", sa.String(5)),
        sa.Column("observed_at", TS),
        sa.Column("sources", JSONType, nullable=False),
        sa.Column("content_sha256", sa.String(64), nullable=False),
        sa.Column("current", sa.Boolean, nullable=False),
        sa.Column("superseded_by", Id),
        sa.Column("superseded_at", TS),
        sa.Column("recorded_at", TS, nullable=False),
        sa.Column("notified_at", TS),
        sa.PrimaryKeyConstraint("id", name="pk_lab_observations"),
        sa.UniqueConstraint("vendor", "item_id", "obs_key", "result_key",
                            name="uq_lab_observations_vendor_item_id_obs_key_result_key"),
    )
    op.create_index("ix_lab_observations_vendor_item_id_current", "lab_observations",
                    ["vendor", "item_id", "current"])
    op.create_index("ix_lab_observations_interpretation_current", "lab_observations",
                    ["interpretation", "current"])
    op.create_index("ix_lab_observations_recorded_at", "lab_observations", ["recorded_at"])
    op.create_table(
        "fhir_exports",
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("last_observation_id", Id, nullable=False),
        sa.Column("exported_at", TS, nullable=False),
        sa.Column("resources", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("target", name="pk_fhir_exports"),
    )


def downgrade() -> None:
    op.drop_table("fhir_exports")
    op.drop_index("ix_lab_observations_recorded_at", table_name="lab_observations")
    op.drop_index("ix_lab_observations_interpretation_current", table_name="lab_observations")
    op.drop_index("ix_lab_observations_vendor_item_id_current", table_name="lab_observations")
    op.drop_table("lab_observations")
