"""Helpers for dashboard tests over httpx: forms with their CSRF token, logins, workers."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from sendkit import accounts, message_log, system_mail
from sendkit.services import Services

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
PASSWORD = "correct horse battery"


def csrf_in(html: str) -> str:
    match = CSRF.search(html)
    assert match is not None, "no CSRF token in the page"
    return match.group(1)


async def form_token(client: httpx.AsyncClient, page: str) -> str:
    response = await client.get(page)
    assert response.status_code == 200, (page, response.status_code, response.text[:500])
    return csrf_in(response.text)


async def submit(
    client: httpx.AsyncClient,
    action: str,
    data: dict[str, Any] | None = None,
    *,
    page: str | None = None,
    files: dict[str, Any] | None = None,
) -> httpx.Response:
    """Post a form the way a browser does: token from the page that shows it."""
    token = await form_token(client, page or action)
    return await client.post(action, data={**(data or {}), "csrf_token": token}, files=files)


async def log_in(client: httpx.AsyncClient, email: str, password: str = PASSWORD) -> httpx.Response:
    response = await submit(client, "/login", {"email": email, "password": password})
    assert response.status_code == 303, response.text[:800]
    return response


async def add_user(
    services: Services, account_id: str, email: str, *, is_operator: bool = False
) -> str:
    return await accounts.create_user(
        services.db, account_id, email, PASSWORD, is_operator=is_operator
    )


async def sign_up(
    client: httpx.AsyncClient, email: str, name: str = "Acme", password: str = PASSWORD
) -> httpx.Response:
    data = {"account_name": name, "email": email, "password": password}
    return await submit(client, "/signup", data)


async def system_mail_to(services: Services, email: str, subject: str) -> message_log.MessageView:
    """The newest system email to `email` with this subject, as the dashboard renders it."""
    system_id = await system_mail.system_account_id(services)
    assert system_id is not None
    viewer = message_log.Viewer(system_id)
    page = await message_log.search(services.db, system_id, message_log.LogFilter(q=email))
    found = [m for m in page.items if m["subject"] == subject]
    assert found, f"no system email {subject!r} to {email}"
    return await message_log.get(services.db, viewer, found[0]["id"])


def link_in(view: message_log.MessageView, path: str) -> str:
    match = re.search(
        r'href="https?://[^/"]+(' + re.escape(path) + r'\?token=[^"]+)"', view.html or ""
    )
    assert match is not None, view.html
    return match.group(1).replace("&amp;", "&")


@asynccontextmanager
async def running_worker(services: Services) -> AsyncIterator[None]:
    """The delivery worker of `sendkit serve`, inside the test's loop."""
    from sendkit.delivery.runner import start_workers

    workers = start_workers(services)
    try:
        yield
    finally:
        await workers.stop()


async def wait_until_delivered(services: Services, message_id: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        async with services.db.read() as conn:
            from sendkit.db import messages

            status = await conn.scalar(
                messages.select()
                .with_only_columns(messages.c.status)
                .where(messages.c.id == message_id)
            )
        if status == "delivered":
            return
        assert time.monotonic() < deadline, f"message {message_id} is still {status}"
        await asyncio.sleep(0.05)
