"""messages: drop ix_messages_account_id

`ix_messages_account_created (account_id, created_at)` answers every lookup by account
(and the cascade from `accounts`) by its first column; the single-column index only
added an entry to maintain on every insert and, on PostgreSQL, on every status update
(which changes indexed columns, so it is never a HOT update).

Dropping an index is quick, but on PostgreSQL it takes the table's exclusive lock: it
waits for the transactions running on `messages` (a few milliseconds each in SendKit)
and holds up the ones that come after it meanwhile.

Revision ID: 0006_messages_account_index
Revises: 0005_contact_count
"""

from __future__ import annotations

from alembic import op

revision = "0006_messages_account_index"
down_revision = "0005_contact_count"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_messages_account_id", table_name="messages")


def downgrade() -> None:
    op.create_index("ix_messages_account_id", "messages", ["account_id"], unique=False)
