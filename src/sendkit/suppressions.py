"""The per-account suppression list: addresses SendKit will not attempt again."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from sendkit.db import now_ms, suppressions


async def add(conn: AsyncConnection, account_id: str, email: str, reason: str) -> None:
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    await conn.execute(
        insert(suppressions)
        .values(
            account_id=account_id, email_lower=email.lower(), reason=reason, created_at=now_ms()
        )
        .on_conflict_do_nothing(index_elements=["account_id", "email_lower"])
    )


async def is_suppressed(conn: AsyncConnection, account_id: str, email: str) -> bool:
    found = await conn.scalar(
        sa.select(suppressions.c.reason).where(
            suppressions.c.account_id == account_id,
            suppressions.c.email_lower == email.lower(),
        )
    )
    return found is not None
