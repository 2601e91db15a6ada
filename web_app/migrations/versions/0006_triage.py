"""Triage first (model 2.0.0): on each case whether the model says it needs a doctor's read, and the
model card's threshold on 1 - p(normal) it used. Cases stored before stay NULL: the pages derive their
triage from the most probable class, as those models did.

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cases") as b:
        b.add_column(sa.Column("needs_read", sa.Boolean))
        b.add_column(sa.Column("triage_threshold", sa.Float))


def downgrade() -> None:
    with op.batch_alter_table("cases") as b:
        b.drop_column("triage_threshold")
        b.drop_column("needs_read")
