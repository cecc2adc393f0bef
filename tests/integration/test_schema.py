"""The migrations build exactly the schema the code declares (`db.metadata`), on both
databases: no index, column or constraint of one is missing from the other."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from sendkit.db import Database, metadata
from sendkit.delivery import queue


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


async def test_a_claim_reads_the_due_index_in_order(database_url: str) -> None:
    """The claim takes the first due messages from the due index as it is ordered: no
    sort of every due row, whose cost grew with the queue (0007)."""
    db = Database(database_url)
    claim = queue._claim_statement(not db.is_sqlite, returning=not db.is_sqlite)
    compiled = claim.compile(dialect=db.engine.dialect)
    values = compiled.construct_params({"now": 1, "until": 2, "token": "t", "limit": 30})
    sql = str(compiled)
    args = tuple(values[name] for name in compiled.positiontup or ())
    try:
        async with db.engine.connect() as conn:
            if db.is_sqlite:
                plan = " ".join(
                    str(row[-1])
                    for row in await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", args)
                )
                assert "ix_messages_due" in plan and "TEMP B-TREE" not in plan, plan
            else:
                # Planned as if the table were large: a small one is read whole either way.
                await conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
                plan = " ".join(
                    str(row[0]) for row in await conn.exec_driver_sql(f"EXPLAIN {sql}", args)
                )
                assert "ix_messages_due" in plan and "Sort" not in plan, plan
    finally:
        await db.dispose()
