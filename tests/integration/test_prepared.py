"""Statements compiled once and run as driver SQL: the same rows as through SQLAlchemy,
on both databases, for any number of rows or keys."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from sendkit import events as events_module
from sendkit import suppressions, unsubscribe
from sendkit.db import events
from sendkit.services import Services
from tests.conftest import Tenant

# The events' insert, as every send's group commit runs it.
_INSERT = events_module._INSERT_EVENTS


async def test_a_multi_row_insert_stores_every_row_past_one_statements_size(
    services: Services, tenant: Tenant
) -> None:
    # 5 columns: 199 rows fit one SQLite statement, so 450 take three.
    rows = [
        {
            "account_id": tenant.account_id,
            "message_id": f"m{i:04d}",
            "type": "queued",
            "data": f'{{"n": {i}}}',
            "created_at": 1_700_000_000_000 + i,
        }
        for i in range(450)
    ]
    async with services.db.begin() as conn:
        await _INSERT.execute_many(conn, rows)
    async with services.db.read() as conn:
        stored = (
            await conn.execute(
                sa.select(events.c.message_id, events.c.data, events.c.created_at)
                .where(events.c.account_id == tenant.account_id)
                .order_by(events.c.message_id)
            )
        ).all()
    assert [tuple(r) for r in stored] == [
        (r["message_id"], r["data"], r["created_at"]) for r in rows
    ]


async def test_lookups_by_a_json_list_of_keys_find_exactly_the_listed_pairs(
    services: Services, tenant: Tenant
) -> None:
    async with services.db.begin() as conn:
        for email in ("a@example.com", "b@example.com"):
            await suppressions.add(conn, tenant.account_id, email, "manual")
    async with services.db.read() as conn:
        found = await suppressions.suppressed_among(
            conn,
            [
                (tenant.account_id, "A@example.com"),
                (tenant.account_id, "c@example.com"),
                ("another-account", "b@example.com"),
                (tenant.account_id, "b@example.com"),
            ],
        )
        none = await unsubscribe.memberships(conn, [("no-app", "a@example.com")])
    assert found == {(tenant.account_id, "a@example.com"), (tenant.account_id, "b@example.com")}
    assert none == {}


def test_a_driver_with_named_parameters_gets_the_core_statement() -> None:
    """psycopg takes named parameters: no driver SQL for it, the statement runs as Core."""
    from sqlalchemy.dialects.postgresql import asyncpg, psycopg
    from sqlalchemy.dialects.sqlite import pysqlite

    assert _INSERT.sql(psycopg.dialect()) is None
    for positional in (asyncpg.dialect(), pysqlite.dialect()):
        found = _INSERT.sql(positional)
        assert found is not None
        assert found[1] == ("account_id", "message_id", "type", "data", "created_at")


async def test_a_multi_row_insert_keeps_nulls_and_a_single_row(
    services: Services, tenant: Tenant
) -> None:
    rows = [
        {
            "account_id": tenant.account_id,
            "message_id": None,
            "type": "queued",
            "data": '{"note": "é \\u2028 \'quoted\'"}',
            "created_at": 1_700_000_000_000,
        }
    ]
    async with services.db.begin() as conn:
        await _INSERT.execute_many(conn, rows)
    async with services.db.read() as conn:
        stored = (
            await conn.execute(
                sa.select(events.c.message_id, events.c.type, events.c.data).where(
                    events.c.account_id == tenant.account_id
                )
            )
        ).all()
    assert [tuple(r) for r in stored] == [(None, "queued", rows[0]["data"])]


async def test_postgresql_inserts_all_rows_in_one_execution(
    services: Services, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One statement executed once (unnest of an array per column), not once per row:
    each execution of a statement costs the server as much as a small row."""
    if services.db.is_sqlite:
        pytest.skip("SQLite takes multi-row VALUES lists (the test above)")
    calls: list[Any] = []
    real = AsyncConnection.exec_driver_sql

    async def counted(self: AsyncConnection, sql: str, params: Any = None, **kw: Any) -> Any:
        calls.append((sql, params))
        return await real(self, sql, params, **kw)

    monkeypatch.setattr(AsyncConnection, "exec_driver_sql", counted)
    rows = [
        {
            "account_id": tenant.account_id,
            "message_id": f"m{i}",
            "type": "queued",
            "data": "{}",
            "created_at": i,
        }
        for i in range(64)
    ]
    async with services.db.begin() as conn:
        await _INSERT.execute_many(conn, rows)
    assert len(calls) == 1
    sql, params = calls[0]
    assert "unnest(" in sql and isinstance(params, tuple) and len(params[0]) == 64
    async with services.db.read() as conn:
        count = await conn.scalar(
            sa.select(sa.func.count()).where(events.c.account_id == tenant.account_id)
        )
    assert count == 64
