"""Server-side sign-in sessions: the cookie names a row here, so that signing out ends it for good (a copied
cookie no longer works) and a password reset ends every session of that user. And on each case the number of
model runs tried, which bounds the automatic resumption of pending cases.

Revision ID: 0007
Revises: 0006
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "user_sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("revoked_at", sa.DateTime),
    )
    op.create_index("ix_user_sessions_user_id", "user_sessions", ["user_id"])
    with op.batch_alter_table("cases") as b:
        b.add_column(sa.Column("attempts", sa.Integer))


def downgrade() -> None:
    with op.batch_alter_table("cases") as b:
        b.drop_column("attempts")
    op.drop_index("ix_user_sessions_user_id", "user_sessions")
    op.drop_table("user_sessions")
