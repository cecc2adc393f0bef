"""Group commit keeps every rule of a single request: concurrent sends share a transaction
but each gets its own answer, and the daily limit is never overshot."""

from __future__ import annotations

import asyncio
import collections
import threading

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from sendkit import accounts, logs, messages
from sendkit.services import Services
from sendkit.syncconn import NotSynchronous
from tests.conftest import SEND_EXAMPLE, Tenant


async def test_concurrent_sends_respect_the_daily_limit_exactly(
    client: httpx.AsyncClient, services: Services, tenant: Tenant
) -> None:
    await accounts.set_plan(services.db, tenant.account_id, rate=1000, daily=7)
    responses = await asyncio.gather(
        *(
            client.post(
                "/v1/send", json=SEND_EXAMPLE | {"to": f"r{i}@example.net"}, headers=tenant.auth
            )
            for i in range(20)
        )
    )
    codes = collections.Counter(r.json()["code"] for r in responses)
    assert codes == {0: 7, 100031: 13}
    assert await messages.sent_today(services.db, tenant.account_id) == 7
    ids = {r.headers["x-message-id"] for r in responses if r.json()["code"] == 0}
    for message_id in ids:
        assert (await messages.find(services.db, message_id)) is not None


async def test_one_callers_failure_does_not_fail_its_neighbours(
    client: httpx.AsyncClient, services: Services, tenant: Tenant
) -> None:
    await accounts.set_plan(services.db, tenant.account_id, rate=1000)
    good = [
        client.post(
            "/v1/send", json=SEND_EXAMPLE | {"to": f"ok{i}@example.net"}, headers=tenant.auth
        )
        for i in range(10)
    ]
    bad = [
        client.post(
            "/v1/send",
            json=SEND_EXAMPLE | {"from": f"x{i}@unregistered-domain.com"},
            headers=tenant.auth,
        )
        for i in range(5)
    ]
    responses = await asyncio.gather(*good, *bad)
    assert [r.json()["code"] for r in responses] == [0] * 10 + [100030] * 5


async def test_the_shared_commit_does_not_carry_the_first_callers_request_id(
    services: Services,
) -> None:
    seen: list[str | None] = []

    async def look(_conn: AsyncConnection) -> None:
        seen.append(logs._request_id.get())

    async def as_request(request_id: str) -> None:
        bound = logs.bind_request(request_id)
        try:
            await services.db.write(look)
        finally:
            logs.unbind_request(bound)

    await asyncio.gather(as_request("first"), as_request("second"))
    # The committer serves both: its log lines must name neither.
    assert seen == [None, None]


async def test_sqlite_groups_commit_whole_on_the_writer_thread_with_full_sync(
    services: Services, backend: str
) -> None:
    """On SQLite a group runs in one hop on its own thread and connection, which keeps
    synchronous=FULL; a write function that awaits anything but the database fails alone."""
    if backend != "sqlite":
        pytest.skip("PostgreSQL groups run on the event loop")
    seen: list[tuple[str, int]] = []

    async def probe(conn: AsyncConnection) -> None:
        synchronous = int(await conn.scalar(sa.text("PRAGMA synchronous")) or 0)
        seen.append((threading.current_thread().name, synchronous))
        await conn.execute(sa.text("CREATE TABLE IF NOT EXISTS probe (x INTEGER)"))
        await conn.execute(sa.text("INSERT INTO probe VALUES (1)"))

    async def waits(conn: AsyncConnection) -> None:
        await conn.execute(sa.text("INSERT INTO probe VALUES (2)"))
        await asyncio.sleep(0)

    await services.db.write(probe)
    outcomes = await asyncio.gather(
        services.db.write(probe), services.db.write(waits), return_exceptions=True
    )
    assert outcomes[0] is None
    assert isinstance(outcomes[1], NotSynchronous)
    assert [name.startswith("sendkit-sqlite-writer") for name, _ in seen] == [True, True]
    assert {synchronous for _, synchronous in seen} == {2}  # FULL
    async with services.db.read() as conn:
        assert list(await conn.scalars(sa.text("SELECT x FROM probe"))) == [1, 1]
