"""contact count: each app's number of contacts, and of contacts deleted

`GET /v1/contact` answered `total` with a count(*) over the app's contacts on every
request. The count is kept on the app instead, changed in the transaction of every insert
and delete; `contacts_deleted` only grows, and with the count it tells a process whether
its cached page positions still hold (`contacts._Marks`).

Revision ID: 0005_contact_count
Revises: 0004_dashboard
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_contact_count"
down_revision = "0004_dashboard"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("apps", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("contact_count", sa.BigInteger(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("contacts_deleted", sa.BigInteger(), server_default="0", nullable=False)
        )
    op.execute(
        "UPDATE apps SET contact_count ="
        " (SELECT count(*) FROM contacts WHERE contacts.app_pk = apps.id)"
    )


def downgrade() -> None:
    with op.batch_alter_table("apps", schema=None) as batch_op:
        batch_op.drop_column("contacts_deleted")
        batch_op.drop_column("contact_count")
