"""Per-account request limits: the plan's requests/second (default 5), all endpoints together.

Over the limit: 429/100025 with Retry-After. Every response past the account checks carries
X-RateLimit-Limit, X-RateLimit-Remaining and X-RateLimit-Reset. With Redis, the budget is
shared by every process that uses the same Redis.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from sendkit import accounts, keys
from sendkit import services as services_mod
from sendkit.config import Settings
from sendkit.services import Services
from sendkit.web.app import create_app
from tests.conftest import (
    REDIS_URL,
    SEND_EXAMPLE,
    Tenant,
    assert_envelope,
    free_port,
    make_settings,
    make_tenant,
    need_server,
)

Call = Callable[[], Awaitable[httpx.Response]]


def expect(response: httpx.Response, status: int, code: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    payload: dict[str, Any] = response.json()
    assert_envelope(payload, code)
    assert response.headers["x-request-id"] == payload["requestId"]
    return payload


def rate_headers(response: httpx.Response) -> tuple[int, int, int]:
    h = response.headers
    return (
        int(h["x-ratelimit-limit"]),
        int(h["x-ratelimit-remaining"]),
        int(h["x-ratelimit-reset"]),
    )


def sender(client: httpx.AsyncClient, tenant: Tenant) -> Call:
    async def call() -> httpx.Response:
        return await client.post("/v1/send", json=SEND_EXAMPLE, headers=tenant.auth)

    return call


def lister(client: httpx.AsyncClient, tenant: Tenant) -> Call:
    async def call() -> httpx.Response:
        return await client.get("/v1/contact", params={"appId": tenant.app_id}, headers=tenant.auth)

    return call


def assert_rate_limited(response: httpx.Response, limit: int) -> None:
    started = time.time()
    payload = expect(response, 429, 100025)
    assert payload["message"] == "Exceeding the maximum sending limit"
    retry_after = int(response.headers["retry-after"])
    assert 1 <= retry_after <= 2
    got_limit, remaining, reset = rate_headers(response)
    assert got_limit == limit
    assert remaining == 0
    assert int(started) <= reset <= started + 2


async def core_limit_test(call: Call) -> None:
    """5 calls pass with a decreasing Remaining, the 6th is 429 with every header."""
    remaining = []
    started = time.time()
    for _ in range(5):
        response = await call()
        expect(response, 200, 0)
        limit, left, reset = rate_headers(response)
        assert limit == 5
        assert int(started) <= reset <= time.time() + 2
        remaining.append(left)
    assert remaining == [4, 3, 2, 1, 0]
    assert_rate_limited(await call(), 5)


def redis_sockets() -> set[str]:
    """Inodes of this process's established TCP connections to port 6379 (Linux /proc)."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            ours.add(target[len("socket:[") : -1])
    found = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], fields[9]
            if remote.endswith(":18EB") and state == "01" and inode in ours:
                found.add(inode)
    return found


@asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[tuple[Services, httpx.AsyncClient]]:
    """What the `client` fixture builds, for settings of the test's own choosing."""
    built = services_mod.build(settings)
    try:
        transport = httpx.ASGITransport(app=create_app(settings, built))
        async with httpx.AsyncClient(transport=transport, base_url="http://sendkit.test") as c:
            yield built, c
    finally:
        await built.close()


# --- in-memory limiter (the default services) ---------------------------------------------


async def test_sixth_request_in_a_second_is_429(client: httpx.AsyncClient, tenant: Tenant) -> None:
    await core_limit_test(sender(client, tenant))


async def test_limit_is_per_account(client: httpx.AsyncClient, services: Services) -> None:
    first = await make_tenant(services)
    second = await make_tenant(services, name="Second")
    await core_limit_test(sender(client, first))
    response = await sender(client, second)()
    expect(response, 200, 0)
    assert rate_headers(response)[1] == 4
    # Keys of the same account share its budget.
    assert_rate_limited(await lister(client, first)(), 5)


async def test_every_endpoint_counts_against_one_budget(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    contact = {"appId": tenant.app_id, "emailAddress": "a@example.com", "status": "Confirmed"}
    responses = [
        await client.get("/v1/contact", params={"appId": tenant.app_id}, headers=tenant.auth),
        await client.post("/v1/contact", json=contact, headers=tenant.auth),
        await client.post("/v1/send", json=SEND_EXAMPLE, headers=tenant.auth),
        await client.delete(
            "/v1/contact",
            params={"appId": tenant.app_id, "emailAddress": "a@example.com"},
            headers=tenant.auth,
        ),
        # A refused call past the account checks still uses the budget.
        await client.post("/v1/send", json={"from": "x"}, headers=tenant.auth),
    ]
    assert [r.json()["code"] for r in responses] == [0, 0, 0, 0, 100033]
    assert [rate_headers(r)[1] for r in responses] == [4, 3, 2, 1, 0]
    for sixth in (
        await client.get("/v1/contact", params={"appId": tenant.app_id}, headers=tenant.auth),
        await client.post("/v1/contact", json=contact, headers=tenant.auth),
        await client.post("/v1/send", json=SEND_EXAMPLE, headers=tenant.auth),
        await client.delete("/v1/contact", params={"appId": tenant.app_id}, headers=tenant.auth),
    ):
        assert_rate_limited(sixth, 5)


async def test_requests_pass_again_after_the_window(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    call = sender(client, tenant)
    await core_limit_test(call)
    # Refused calls do not push the window further out.
    assert_rate_limited(await call(), 5)
    await asyncio.sleep(1.1)
    response = await call()
    expect(response, 200, 0)
    assert rate_headers(response)[1] == 4


async def test_plan_rate_sets_the_limit(
    client: httpx.AsyncClient, services: Services, tenant: Tenant
) -> None:
    await accounts.set_plan(services.db, tenant.account_id, rate=2)
    call = sender(client, tenant)
    first, second = await call(), await call()
    expect(first, 200, 0)
    expect(second, 200, 0)
    assert [rate_headers(r)[:2] for r in (first, second)] == [(2, 1), (2, 0)]
    assert_rate_limited(await call(), 2)


async def test_raised_plan_rate_lets_more_through(
    client: httpx.AsyncClient, services: Services, tenant: Tenant
) -> None:
    await accounts.set_plan(services.db, tenant.account_id, rate=8)
    call = lister(client, tenant)
    for expected_left in range(7, -1, -1):
        response = await call()
        expect(response, 200, 0)
        assert rate_headers(response)[:2] == (8, expected_left)
    assert_rate_limited(await call(), 8)


async def concurrent_burst(call: Call, count: int) -> list[int]:
    responses = await asyncio.gather(*(call() for _ in range(count)))
    return sorted(r.status_code for r in responses)


async def test_concurrent_burst_lets_exactly_the_limit_through(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    assert await concurrent_burst(lister(client, tenant), 10) == [200] * 5 + [429] * 5


# --- Redis: shared by every process ----------------------------------------------------------


@pytest.mark.redis
async def test_redis_limiter_core(tmp_path: Path, database_url: str) -> None:
    need_server("Redis", "127.0.0.1", 6379)
    settings = make_settings(tmp_path, database_url, redis_url=REDIS_URL)
    async with app_client(settings) as (services, client):
        assert services.redis is not None
        tenant = await make_tenant(services)
        other = await make_tenant(services, name="Other")
        await core_limit_test(sender(client, tenant))
        expect(await sender(client, other)(), 200, 0)


@pytest.mark.redis
async def test_redis_concurrent_burst_across_two_processes(
    tmp_path: Path, database_url: str
) -> None:
    need_server("Redis", "127.0.0.1", 6379)
    settings = make_settings(tmp_path, database_url, redis_url=REDIS_URL)
    async with (
        app_client(settings) as (services_a, client_a),
        app_client(settings) as (
            _services_b,
            client_b,
        ),
    ):
        tenant = await make_tenant(services_a)
        calls = [lister(client_a, tenant), lister(client_b, tenant)] * 5
        responses = await asyncio.gather(*(call() for call in calls))
        assert sorted(r.status_code for r in responses) == [200] * 5 + [429] * 5


@pytest.mark.redis
async def test_redis_budget_is_shared_by_two_processes(tmp_path: Path, database_url: str) -> None:
    need_server("Redis", "127.0.0.1", 6379)
    settings = make_settings(tmp_path, database_url, redis_url=REDIS_URL)
    async with (
        app_client(settings) as (services_a, client_a),
        app_client(settings) as (
            services_b,
            client_b,
        ),
    ):
        assert services_a.limiter is not services_b.limiter
        tenant = await make_tenant(services_a)
        on_a, on_b = sender(client_a, tenant), lister(client_b, tenant)
        remaining = []
        for call in (on_a, on_a, on_a, on_b, on_b):
            response = await call()
            expect(response, 200, 0)
            remaining.append(rate_headers(response)[1])
        assert remaining == [4, 3, 2, 1, 0]
        # The 6th request, whichever process it reaches, is over the shared budget.
        assert_rate_limited(await on_b(), 5)
        assert_rate_limited(await on_a(), 5)


@pytest.mark.redis
async def test_redis_budget_is_shared_after_the_window_too(
    tmp_path: Path, database_url: str
) -> None:
    need_server("Redis", "127.0.0.1", 6379)
    settings = make_settings(tmp_path, database_url, redis_url=REDIS_URL)
    async with (
        app_client(settings) as (services_a, client_a),
        app_client(settings) as (
            _services_b,
            client_b,
        ),
    ):
        tenant = await make_tenant(services_a)
        await accounts.set_plan(services_a.db, tenant.account_id, rate=2)
        expect(await sender(client_a, tenant)(), 200, 0)
        expect(await sender(client_b, tenant)(), 200, 0)
        assert_rate_limited(await sender(client_a, tenant)(), 2)
        await asyncio.sleep(1.1)
        expect(await sender(client_b, tenant)(), 200, 0)


@pytest.mark.redis
async def test_closing_services_releases_every_redis_connection(
    tmp_path: Path, database_url: str
) -> None:
    need_server("Redis", "127.0.0.1", 6379)
    settings = make_settings(tmp_path, database_url, redis_url=REDIS_URL)
    before = redis_sockets()
    built = services_mod.build(settings)
    try:
        transport = httpx.ASGITransport(app=create_app(settings, built))
        async with httpx.AsyncClient(transport=transport, base_url="http://sendkit.test") as c:
            tenant = await make_tenant(built, signing=True)
            assert tenant.signing_secret is not None
            raw = json.dumps(SEND_EXAMPLE).encode()
            ts = str(int(time.time()))
            headers = {
                **tenant.auth,
                "Content-Type": "application/json",
                "X-SendKit-Timestamp": ts,
                "X-SendKit-Signature": keys.sign_request(
                    tenant.signing_secret, ts, "POST", "/v1/send", raw
                ),
            }
            # A signed call uses both the replay guard's and the limiter's Redis.
            expect(await c.post("/v1/send", content=raw, headers=headers), 200, 0)
            assert redis_sockets() - before, "the test did not reach Redis at all"
        await built.close()
        leaked = redis_sockets() - before
        assert not leaked, f"{len(leaked)} Redis connection(s) still open after close()"
    finally:
        await built.close()  # idempotent; covers an early failure above


async def _evalsha_calls(client: Any) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.mark.redis
async def test_redis_hits_of_a_burst_share_round_trips_and_each_counts_as_alone() -> None:
    """Hits that arrive while a call is out go in the next one, each counted in order:
    exactly each account's limit passes, and the remaining counts go down one by one."""
    need_server("Redis", "127.0.0.1", 6379)
    import redis.asyncio as aioredis

    from sendkit.errors import RateLimited
    from sendkit.ratelimit import RateLimiter

    client = aioredis.from_url(REDIS_URL)
    limiter = RateLimiter(redis=client)
    first, second = f"burst-a-{os.getpid()}-{time.time_ns()}", f"burst-b-{time.time_ns()}"
    try:
        await limiter.hit(first, 100)  # the script is loaded; the window holds one hit
        before = await _evalsha_calls(client)
        hits = [
            limiter.hit(account, limit)
            for _ in range(15)
            for account, limit in ((first, 8), (second, 3))
        ]
        outcomes = await asyncio.gather(*hits, return_exceptions=True)
        calls = await _evalsha_calls(client) - before
    finally:
        await client.aclose()
    passed_first = [o.remaining for o in outcomes[0::2] if not isinstance(o, BaseException)]
    passed_second = [o.remaining for o in outcomes[1::2] if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert passed_first == [6, 5, 4, 3, 2, 1, 0]  # 8 per second, one hit already in
    assert passed_second == [2, 1, 0]
    assert len(refused) == 20 and all(isinstance(o, RateLimited) for o in refused)
    assert 1 <= calls < len(hits)


async def test_redis_failing_answers_every_hit_of_a_batch_with_the_error() -> None:
    """No caller is left waiting when the shared call fails (here: nothing listens)."""
    import redis.asyncio as aioredis
    from redis.exceptions import ConnectionError as RedisConnectionError

    from sendkit.ratelimit import RateLimiter

    client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}")
    limiter = RateLimiter(redis=client)
    try:
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(limiter.hit("acct", 10) for _ in range(5)), return_exceptions=True),
            timeout=10,
        )
    finally:
        await client.aclose()
    assert all(isinstance(o, RedisConnectionError) for o in outcomes), outcomes
