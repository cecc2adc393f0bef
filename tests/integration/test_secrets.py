"""Plain API keys and signing secrets are shown once and kept nowhere: not in the
database (tables, SQLite file and WAL) and not in the server's logs."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import httpx
import pytest

from sendkit import accounts, apps, keys
from sendkit import services as services_mod
from sendkit.config import Settings
from sendkit.db import metadata
from sendkit.services import Services
from tests.conftest import SEND_EXAMPLE, Tenant, free_port, make_settings, make_tenant

SECRET_KEY = "secrets-test-server-key"


def fragments(secret: str) -> list[str]:
    """The secret, and its part after the visible `sk_xxxxxxxx` / `ss_` prefix."""
    return [secret, secret[len(keys.KEY_PREFIX) + 8 :]]


async def table_dump(services: Services) -> str:
    """Every value of every table, as text."""
    parts: list[str] = []
    async with services.db.read() as conn:
        for table in metadata.sorted_tables:
            for row in (await conn.execute(table.select())).all():
                for value in row:
                    parts.append(str(value))
                    if isinstance(value, bytes | bytearray | memoryview):
                        parts.append(bytes(value).decode("utf-8", "replace"))
    return "\n".join(parts)


def sqlite_files(data_dir: Path) -> bytes:
    files = sorted(data_dir.glob("sendkit.db*"))
    assert data_dir / "sendkit.db" in files
    return b"".join(f.read_bytes() for f in files)


def assert_absent(haystack: str | bytes, plain: Iterable[str], where: str) -> None:
    for secret in plain:
        for fragment in fragments(secret):
            needle = fragment.encode() if isinstance(haystack, bytes) else fragment
            assert needle not in haystack, f"a plain secret is stored in {where}"


def signed(secret: str, method: str, path: str, body: bytes) -> dict[str, str]:
    timestamp = str(int(time.time()))
    return {
        "Content-Type": "application/json; charset=utf-8",
        "X-SendKit-Timestamp": timestamp,
        "X-SendKit-Signature": keys.sign_request(secret, timestamp, method, path, body),
    }


async def test_database_keeps_no_plain_key_or_signing_secret(
    backend: str, services: Services, client: httpx.AsyncClient, settings: Settings
) -> None:
    plain = await make_tenant(services, signing=True)
    strict = await make_tenant(
        services, name="Strict", domain="strict.example", signing=True, require_signature=True
    )
    for t in (plain, strict):
        await accounts.set_plan(services.db, t.account_id, rate=10_000)
    spare = await keys.create(services.db, services.box, plain.account_id, name="spare")
    doomed = await keys.create(services.db, services.box, plain.account_id, signing=True)
    await keys.revoke(services.db, doomed.prefix)
    assert plain.signing_secret and strict.signing_secret and doomed.signing_secret

    async def call(t: Tenant, method: str, path: str, body: bytes, sign: bool) -> int:
        headers = dict(t.auth)
        if sign:
            assert t.signing_secret
            headers |= signed(t.signing_secret, method, path, body)
        response = await client.request(method, path, content=body, headers=headers)
        return response.status_code

    contact = json.dumps(
        {"appId": plain.app_id, "emailAddress": "c@example.com", "status": "Confirmed"}
    ).encode()
    mail = json.dumps(SEND_EXAMPLE).encode()
    strict_mail = json.dumps({**SEND_EXAMPLE, "from": "from@strict.example"}).encode()
    assert await call(plain, "POST", "/v1/contact", contact, sign=False) == 200
    assert await call(plain, "POST", "/v1/send", mail, sign=True) == 200
    assert await call(plain, "GET", f"/v1/contact?appId={plain.app_id}", b"", sign=True) == 200
    assert await call(strict, "POST", "/v1/send", strict_mail, sign=True) == 200
    assert await call(strict, "POST", "/v1/send", strict_mail, sign=False) == 401
    revoked = Tenant(plain.account_id, plain.app_id, doomed.api_key, None, doomed.prefix)
    assert await call(revoked, "POST", "/v1/send", mail, sign=False) == 401
    unsigned_key = Tenant(plain.account_id, plain.app_id, spare.api_key, None, spare.prefix)
    assert await call(unsigned_key, "GET", f"/v1/contact?appId={plain.app_id}", b"", False) == 200
    assert await call(plain, "POST", "/v1/send", mail, sign=False) == 200

    everything = [
        plain.token,
        strict.token,
        spare.api_key,
        doomed.api_key,
        plain.signing_secret,
        strict.signing_secret,
        doomed.signing_secret,
    ]
    dump = await table_dump(services)
    # The dump is real: the visible prefixes and the sent mail are in it.
    for prefix in (plain.key_prefix, strict.key_prefix, spare.prefix, doomed.prefix):
        assert prefix in dump
    assert "test content" in dump
    assert_absent(dump, everything, "a table")
    # The secrets are still usable, so they are kept, just not in the clear.
    for token in (plain.token, strict.token, spare.api_key):
        await keys.authenticate(services.db, services.box, token)

    if backend == "sqlite":
        raw = sqlite_files(settings.data_dir)
        assert plain.key_prefix.encode() in raw
        assert_absent(raw, everything, "the SQLite files")


# --- a live server -------------------------------------------------------------------


def sendkit_cli(env: dict[str, str], data_dir: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "sendkit", *args, "--data-dir", str(data_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def wait_until_serving(server: subprocess.Popen[bytes], base: str, logs: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited early:\n{logs.read_text(errors='replace')}")
        try:
            httpx.get(base + "/v1/contact", timeout=0.5)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    pytest.fail(f"the server did not answer within 15 s:\n{logs.read_text(errors='replace')}")


def provision(database_url: str, data_dir: Path) -> tuple[str, str, keys.CreatedKey]:
    """An active account with an app and a key that gets revoked, made in process."""

    async def go() -> tuple[str, str, keys.CreatedKey]:
        services = services_mod.build(
            make_settings(data_dir.parent, database_url, secret_key=SECRET_KEY)
        )
        try:
            account_id = await accounts.create(services.db, "Live", active=True)
            app = await apps.create(services.db, account_id, "Live app")
            doomed = await keys.create(services.db, services.box, account_id, signing=True)
            await keys.revoke(services.db, doomed.prefix)
            return account_id, app.app_id, doomed
        finally:
            await services.close()

    return asyncio.run(go())


def test_live_server_logs_request_ids_but_never_secrets(
    backend: str, database_url: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENDKIT_")} | {
        "SENDKIT_DATABASE_URL": database_url,
        "SENDKIT_SECRET_KEY": SECRET_KEY,
        "SENDKIT_JSON_LOGS": "true",
        "SENDKIT_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    account_id, app_id, doomed = provision(database_url, data_dir)
    garbage = "sk_" + secrets.token_urlsafe(32)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out_path, err_path = tmp_path / "server.out", tmp_path / "server.err"
    request_ids: list[str] = []
    with out_path.open("wb") as out, err_path.open("wb") as err:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sendkit",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
            ],
            env=env,
            stdout=out,
            stderr=err,
        )
        try:
            # The key is made by the CLI while the server starts (both take a while).
            created = json.loads(
                sendkit_cli(
                    env, data_dir, "key", "create", "--account", account_id, "--signing", "--json"
                )
            )
            api_key, signing_secret = created["apiKey"], created["signingSecret"]
            everything = [
                api_key,
                signing_secret,
                doomed.api_key,
                str(doomed.signing_secret),
                garbage,
            ]
            wait_until_serving(server, base, err_path)
            with httpx.Client(base_url=base, timeout=10) as http:
                good = {"Authorization": f"Bearer {api_key}"}
                contact = {"appId": app_id, "emailAddress": "c@example.com", "status": "Confirmed"}
                body = json.dumps(contact).encode()
                sign = signed(signing_secret, "POST", "/v1/contact", body)
                wrong = {**sign, "X-SendKit-Signature": "0" * 64}
                exchanges = [
                    (http.get("/v1/contact", params={"appId": app_id}, headers=good), 200),
                    (http.post("/v1/contact", content=body, headers=good | sign), 200),
                    (http.post("/v1/contact", content=body, headers=good | wrong), 401),
                    (
                        http.post(
                            "/v1/contact",
                            json={**contact, "emailAddress": api_key},
                            headers=good,
                        ),
                        400,
                    ),
                    (http.get("/v1/contact", params={"appId": "1"}, headers=good), 404),
                    (
                        http.post(
                            "/v1/send",
                            json=SEND_EXAMPLE,
                            headers={"Authorization": f"Bearer {doomed.api_key}"},
                        ),
                        401,
                    ),
                    (
                        http.get(
                            "/v1/contact",
                            params={"appId": app_id},
                            headers={"Authorization": f"Bearer {garbage}"},
                        ),
                        401,
                    ),
                    (
                        http.get(
                            "/v1/contact",
                            params={"appId": app_id},
                            headers={"Authorization": f"Token {api_key}"},
                        ),
                        401,
                    ),
                ]
                for response, status in exchanges:
                    assert response.status_code == status, response.text
                    assert response.json()["requestId"] == response.headers["x-request-id"]
                    request_ids.append(response.headers["x-request-id"])
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=5)

    logs = out_path.read_text(errors="replace") + err_path.read_text(errors="replace")
    for request_id in request_ids:
        assert request_id in logs, f"requestId {request_id} is not in the server's logs"
    assert_absent(logs, everything, "the server's logs")

    async def stored() -> str:
        services = services_mod.build(make_settings(tmp_path, database_url, secret_key=SECRET_KEY))
        try:
            return await table_dump(services)
        finally:
            await services.close()

    dump = asyncio.run(stored())
    assert created["prefix"] in dump
    assert_absent(dump, everything, "a table")
    if backend == "sqlite":
        assert_absent(sqlite_files(data_dir), everything, "the SQLite files")
