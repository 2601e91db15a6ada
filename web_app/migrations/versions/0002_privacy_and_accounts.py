"""Privacy and accounts: token expiry and revocation, sign-in throttling, audit
addresses; original upload file names removed from existing cases.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_tokens") as b:
        b.add_column(sa.Column("expires_at", sa.DateTime))
        b.add_column(sa.Column("revoked_at", sa.DateTime))
    with op.batch_alter_table("audit_log") as b:
        b.add_column(sa.Column("address", sa.String(64)))
    op.create_index("ix_audit_log_action", "audit_log", ["action"])
    op.create_table(
        "sign_in_failures",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("last_failure", sa.DateTime, nullable=False),
        sa.Column("blocked_until", sa.DateTime),
        sa.UniqueConstraint("scope", "key"),
    )
    # upload names are often the patient's name: replace them by the case id,
    # and on SQLite overwrite the freed space too
    if op.get_bind().dialect.name == "sqlite":
        op.execute("PRAGMA secure_delete = ON")
    op.execute("UPDATE cases SET filename = 'case-' || id")
    op.execute("UPDATE audit_log SET detail = NULL WHERE action = 'upload'")


def downgrade() -> None:
    op.drop_table("sign_in_failures")
    op.drop_index("ix_audit_log_action", "audit_log")
    with op.batch_alter_table("audit_log") as b:
        b.drop_column("address")
    with op.batch_alter_table("api_tokens") as b:
        b.drop_column("revoked_at")
        b.drop_column("expires_at")
