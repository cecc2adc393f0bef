"""Group commit keeps every rule of a single request: concurrent sends share a transaction
but each gets its own answer, and the daily limit is never overshot."""

from __future__ import annotations

import asyncio
import collections

import httpx
from sqlalchemy.ext.asyncio import AsyncConnection

from sendkit import accounts, logs, messages
from sendkit.services import Services
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
