"""When an analysis of a pending case last started, so that the resumer of one web node does not take a case
another node is analysing (several nodes on one database).

Revision ID: 0008
Revises: 0007
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cases") as b:
        b.add_column(sa.Column("claimed_at", sa.DateTime))


def downgrade() -> None:
    with op.batch_alter_table("cases") as b:
        b.drop_column("claimed_at")
