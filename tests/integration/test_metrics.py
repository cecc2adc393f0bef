"""`/metrics` (Prometheus text), `/healthz` and `/readyz`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sendkit.config import Settings
from sendkit.services import Services
from sendkit.web.app import create_app
from tests.conftest import SEND_EXAMPLE, Tenant, assert_envelope
from tests.integration.eventkit import api, opened, send, status_is, tenant_for, workers


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_requests_queue_and_deliveries(
    tmp_path: Path, database_url: str
) -> None:
    async with opened(tmp_path, database_url) as services, api(services) as client:
        tenant = await tenant_for(services)
        message_id = await send(client, tenant)
        await client.post("/v1/send", json=SEND_EXAMPLE, headers={"Authorization": "Bearer no"})
        await client.get("/no/such/page/123")
        await client.get(f"/u/1-{'a' * 26}")
        before = await scrape(client)
        requests = "sendkit_http_requests_total"
        assert value(before, requests, route="/v1/send", method="POST", code="200") == 1
        assert value(before, requests, route="/v1/send", method="POST", code="401") == 1
        # Templates, never raw paths: no series per id or token.
        assert value(before, requests, route="<unmatched>", method="GET", code="404") == 1
        assert value(before, requests, route="/u/{token}", method="GET", code="404") == 1
        assert value(before, "sendkit_queue_depth", status="queued") == 1
        assert value(before, "sendkit_queue_depth", status="deferred") == 0
        assert value(before, "sendkit_http_request_duration_seconds_count", route="/v1/send") == 2

        async with workers(services, webhooks=False):
            await status_is(services, message_id, "delivered")
        after = await scrape(client)
        assert value(after, "sendkit_queue_depth", status="queued") == 0
        assert value(after, "sendkit_deliveries_total", outcome="delivered") == 1
        assert value(after, "sendkit_delivery_latency_seconds_count", outcome="delivered") == 1
        assert value(after, "sendkit_delivery_attempt_seconds_count") == 1
        assert value(after, requests, route="/metrics", method="GET", code="200") == 1


async def test_health_and_ready(tmp_path: Path, database_url: str) -> None:
    async with opened(tmp_path, database_url) as services, api(services) as client:
        for path in ("/healthz", "/readyz"):
            response = await client.get(path)
            assert response.status_code == 200, path
            assert_envelope(response.json(), 0)


@pytest.mark.parametrize(
    "url",
    ["sqlite+aiosqlite:////nonexistent/dir/sendkit.db", "postgresql+asyncpg://x@127.0.0.1:1/x"],
    ids=["sqlite", "postgres"],
)
async def test_not_ready_without_a_database(tmp_path: Path, url: str) -> None:
    async with opened(tmp_path, url) as services, api(services) as client:
        assert (await client.get("/healthz")).status_code == 200  # the process is up...
        response = await client.get("/readyz")  # ...but cannot serve
        assert response.status_code == 503
        assert_envelope(response.json(), 100503)
        # aiosqlite stops a connection that failed to open from its own thread, after the
        # request has answered; let that finish while this test's event loop still runs.
        await asyncio.sleep(0.2)


async def test_a_request_cancelled_midway_is_still_counted(
    settings: Settings, services: Services, tenant: Tenant
) -> None:
    """A client that goes away while its body is read: uvicorn cancels the request task,
    and the request still shows in /metrics (and the access log)."""
    app = create_app(settings, services)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/send",
        "raw_path": b"/v1/send",
        "query_string": b"",
        "headers": [(b"authorization", tenant.auth["Authorization"].encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "root_path": "",
    }
    body_awaited = asyncio.Event()

    async def receive() -> dict[str, object]:
        body_awaited.set()
        await asyncio.Event().wait()  # the body never comes
        raise AssertionError("unreachable")

    async def send(_message: dict[str, object]) -> None:
        raise AssertionError("nothing is sent to a client that left")

    request = asyncio.create_task(app(scope, receive, send))
    await asyncio.wait_for(body_awaited.wait(), 10)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert services.metrics.http.count("/v1/send", "POST", 500) == 1
