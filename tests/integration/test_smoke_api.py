"""The documented happy paths through the app, on both databases."""

from __future__ import annotations

import httpx
from fastapi.routing import APIRoute

from sendkit.config import Settings
from sendkit.services import Services
from sendkit.web import api
from sendkit.web.app import _direct_routes, create_app
from tests.conftest import SEND_EXAMPLE, Tenant, assert_envelope


async def test_send_is_accepted_and_queued(client: httpx.AsyncClient, tenant: Tenant) -> None:
    response = await client.post("/v1/send", json=SEND_EXAMPLE, headers=tenant.auth)
    assert response.status_code == 200
    payload = response.json()
    assert_envelope(payload, 0)
    assert payload["message"] == "Successfully"
    assert payload["data"] is None
    assert response.headers["x-request-id"] == payload["requestId"]
    assert len(response.headers["x-message-id"]) == 32


async def test_contact_round_trip(client: httpx.AsyncClient, tenant: Tenant) -> None:
    contact = {
        "appId": tenant.app_id,
        "emailAddress": "john.doe@example.com",
        "status": "Confirmed",
        "data": {"firstName": "John", "vipLevel": 1},
    }
    saved = await client.post("/v1/contact", json=contact, headers=tenant.auth)
    assert saved.json()["code"] == 0
    listed = await client.get("/v1/contact", params={"appId": tenant.app_id}, headers=tenant.auth)
    data = listed.json()["data"]
    assert data["total"] == 1 and data["page"] == 1 and data["pageSize"] == 500
    assert data["list"][0]["firstName"] == "John"


def test_documented_routes_are_called_directly_and_stay_registered() -> None:
    """RequestContext serves the four documented routes without FastAPI's routing; the
    router keeps them too (OpenAPI, 405 with Allow for other methods)."""
    direct = _direct_routes()
    assert set(direct) == {
        ("POST", "/v1/send"),
        ("GET", "/v1/contact"),
        ("POST", "/v1/contact"),
        ("DELETE", "/v1/contact"),
    }
    registered = {
        (method, route.path): route.endpoint
        for route in api.router.routes
        if isinstance(route, APIRoute)
        for method in route.methods or ()
    }
    assert {key: handler for key, (_route, handler) in direct.items()} == registered


async def test_documented_routes_are_answered_before_fastapis_layers(
    settings: Settings, services: Services, tenant: Tenant
) -> None:
    """The app's door answers `/v1` without building Starlette's middleware stack (its
    error, telemetry and exception layers); any other route goes through it."""
    app = create_app(settings, services)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        sent = await client.post("/v1/send", json=SEND_EXAMPLE, headers=tenant.auth)
        assert sent.status_code == 200, sent.text
        assert sent.headers["x-request-id"] == sent.json()["requestId"]
        assert app.middleware_stack is None
        health = await client.get("/healthz")
        assert health.status_code == 200
        assert app.middleware_stack is not None
