"""Helpers shared by the events, webhooks, unsubscribe, suppression, bounce, SMTP and
metrics tests: services with fast schedules, an in-process API client, running workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx

from sendkit import accounts, messages
from sendkit import services as services_mod
from sendkit.delivery.worker import Worker, make_transport
from sendkit.services import Services
from sendkit.smtpd.server import SmtpServer
from sendkit.web.app import create_app
from sendkit.webhooks import WebhookWorker
from tests.conftest import SEND_EXAMPLE, Tenant, make_settings, make_tenant

T = TypeVar("T")

FAST: dict[str, Any] = {
    "poll_interval": 0.05,
    "retry_schedule": "0.3;give_up=2;jitter=0",
    "webhook_retry_schedule": "0.2;give_up=30;jitter=0",
    "webhook_allow_cidrs": "127.0.0.0/8",
    "webhook_timeout": 2,
    "smtp_timeout": 3,
    "shutdown_timeout": 5,
    "ehlo_name": "sendkit.test",
    "base_url": "https://mail.sendkit.test",
}


def build_services(tmp_path: Path, database_url: str, **overrides: Any) -> Services:
    return services_mod.build(make_settings(tmp_path, database_url, **(FAST | overrides)))


@asynccontextmanager
async def opened(tmp_path: Path, database_url: str, **overrides: Any) -> AsyncIterator[Services]:
    services = build_services(tmp_path, database_url, **overrides)
    try:
        yield services
    finally:
        await services.close()


@asynccontextmanager
async def api(services: Services) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(services.settings, services)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sendkit.test") as client:
        yield client


async def tenant_for(services: Services, **options: Any) -> Tenant:
    """A tenant whose plan allows many requests a second: tests poll the API."""
    tenant = await make_tenant(services, **options)
    await accounts.set_plan(services.db, tenant.account_id, rate=1000)
    return tenant


async def send(client: httpx.AsyncClient, tenant: Tenant, **fields: Any) -> str:
    response = await client.post("/v1/send", json=SEND_EXAMPLE | fields, headers=tenant.auth)
    assert response.json()["code"] == 0, response.text
    return response.headers["x-message-id"]


@asynccontextmanager
async def workers(services: Services, *, webhooks: bool = True) -> AsyncIterator[None]:
    """The delivery worker (and the webhook worker) running until the block ends."""
    stop = asyncio.Event()
    worker = Worker(services, make_transport(services.settings, services.db))
    tasks = [asyncio.create_task(worker.run(stop))]
    hooks = WebhookWorker(services) if webhooks else None
    if hooks is not None:
        tasks.append(asyncio.create_task(hooks.run(stop)))
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await worker.transport.close()
        if hooks is not None:
            await hooks.close()


@asynccontextmanager
async def smtpd(services: Services) -> AsyncIterator[SmtpServer]:
    server = SmtpServer(services)
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.stop()


async def eventually(
    check: Callable[[], Awaitable[T | None]], *, timeout: float = 10, what: str = "condition"
) -> T:
    """Poll until `check` returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s (last: {value!r})")
        await asyncio.sleep(0.05)


async def status_is(services: Services, message_id: str, *statuses: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        found = await messages.find(services.db, message_id)
        return found if found is not None and found["status"] in statuses else None

    return await eventually(check, what=f"{message_id} in {statuses}")
