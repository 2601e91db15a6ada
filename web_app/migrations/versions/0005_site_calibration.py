"""Local recalibration: versioned site calibrations, and on each case the model's own probabilities, the
site calibration version its shown result used, and the image's gray-level statistics (drift checks).

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "site_calibrations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("created_by", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("temperature", sa.Float, nullable=False),
        sa.Column("margin_threshold", sa.Float, nullable=False),
        sa.Column("n_cases", sa.Integer, nullable=False),
        sa.Column("check", sa.JSON, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("previous_id", sa.Integer),
        sa.Column("rolled_back_at", sa.DateTime),
    )
    op.create_index("ix_site_calibrations_model", "site_calibrations", ["model"])
    with op.batch_alter_table("cases") as b:
        b.add_column(sa.Column("model_probabilities", sa.JSON))
        b.add_column(sa.Column("calibration_version", sa.Integer))
        b.add_column(sa.Column("image_stats", sa.JSON))


def downgrade() -> None:
    with op.batch_alter_table("cases") as b:
        b.drop_column("image_stats")
        b.drop_column("calibration_version")
        b.drop_column("model_probabilities")
    op.drop_table("site_calibrations")
