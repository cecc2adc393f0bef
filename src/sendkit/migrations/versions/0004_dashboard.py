"""dashboard: when an account was first activated

An account that was activated once and is inactive now was deactivated by an operator:
its owner's activation links (old or new) must not turn it back on.

Revision ID: 0004_dashboard
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_dashboard"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("activated_at", sa.BigInteger(), nullable=True))
    op.execute("UPDATE accounts SET activated_at = created_at WHERE active")


def downgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_column("activated_at")
