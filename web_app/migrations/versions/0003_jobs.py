"""Jobs: the id of the attempt a case waits for, so that a result delivered twice
(by a broker, after a model server died mid-job) is written once.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cases") as b:
        b.add_column(sa.Column("job_id", sa.String(32)))


def downgrade() -> None:
    with op.batch_alter_table("cases") as b:
        b.drop_column("job_id")
