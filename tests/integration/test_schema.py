"""The migrations build exactly the schema the code declares (`db.metadata`), on both
databases: no index, column or constraint of one is missing from the other."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from sendkit.db import Database, metadata


async def test_the_migrated_schema_is_the_declared_one(database_url: str) -> None:
    db = Database(database_url)
    try:
        async with db.engine.connect() as conn:
            differences = await conn.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), metadata)
            )
    finally:
        await db.dispose()
    assert differences == []


async def test_messages_are_found_by_account_without_an_index_of_their_own(
    database_url: str,
) -> None:
    """ix_messages_account_created serves lookups by account (0006 dropped the other)."""
    db = Database(database_url)
    try:
        async with db.engine.connect() as conn:
            indexes = await conn.run_sync(lambda sync: sa.inspect(sync).get_indexes("messages"))
    finally:
        await db.dispose()
    columns = {index["name"]: index["column_names"] for index in indexes}
    assert "ix_messages_account_id" not in columns
    assert columns["ix_messages_account_created"][0] == "account_id"
