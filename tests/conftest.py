"""Shared fixtures: real databases (SQLite and PostgreSQL), the app, seeded accounts.

PostgreSQL: one database per session, migrated once, truncated before each test.
SQLite: one migrated template file per session, copied for each test.
Set SENDKIT_REQUIRE_SERVICES=1 (CI does) to fail instead of skip when a server is missing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import structlog

from sendkit import accounts, apps, domains, keys
from sendkit import services as services_mod
from sendkit.config import Settings
from sendkit.db import Database, metadata
from sendkit.migrate import migrate
from sendkit.services import Services
from sendkit.web.app import create_app

PG_HOST = os.environ.get("SENDKIT_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("SENDKIT_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("SENDKIT_TEST_PG_USER", "postgres")
REDIS_URL = os.environ.get("SENDKIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE = os.environ.get("SENDKIT_REQUIRE_SERVICES") == "1"


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def need_server(name: str, host: str, port: int) -> None:
    if _port_open(host, port):
        return
    message = f"{name} is not running on {host}:{port}"
    if REQUIRE:
        pytest.fail(message + " (SENDKIT_REQUIRE_SERVICES=1)")
    pytest.skip(message + "; start it or see .ci/services.sh")


def pg_url(database: str, driver: str = "asyncpg") -> str:
    return f"postgresql+{driver}://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database="postgres")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _migrate_url(url: str) -> None:
    db = Database(url)
    try:
        await migrate(db)
    finally:
        await db.dispose()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Commands under test configure structlog; every test starts from the same setup."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    need_server("PostgreSQL", PG_HOST, PG_PORT)
    name = f"sendkit_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    asyncio.run(_migrate_url(pg_url(name)))
    yield pg_url(name)
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "sendkit.db"
    asyncio.run(_migrate_url(f"sqlite+aiosqlite:///{path}"))
    return path


async def truncate_all(url: str) -> None:
    db = Database(url)
    try:
        async with db.begin() as conn:
            names = ", ".join(f'"{t.name}"' for t in metadata.sorted_tables)
            await conn.execute(sa.text(f"TRUNCATE {names} CASCADE"))
    finally:
        await db.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "postgres":
        url: str = request.getfixturevalue("pg_database")
        asyncio.run(truncate_all(url))
        return url
    template: Path = request.getfixturevalue("sqlite_template")
    target = tmp_path / "data" / "sendkit.db"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, target)
    return f"sqlite+aiosqlite:///{target}"


def make_settings(tmp_path: Path, database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "database_url": database_url,
        "secret_key": "test-secret-key-not-for-production",
        "environment": "test",
        "json_logs": True,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return make_settings(tmp_path, database_url)


@pytest.fixture
async def services(settings: Settings) -> AsyncIterator[Services]:
    built = services_mod.build(settings)
    yield built
    await built.close()


@pytest.fixture
async def client(settings: Settings, services: Services) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, services)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sendkit.test") as c:
        yield c


@dataclass
class Tenant:
    account_id: str
    app_id: str
    token: str
    signing_secret: str | None
    key_prefix: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def make_tenant(
    services: Services,
    *,
    name: str = "Acme",
    active: bool = True,
    domain: str = "example.com",
    sender: str | None = "*",
    verified: bool = True,
    signing: bool = False,
    require_signature: bool = False,
) -> Tenant:
    db = services.db
    account_id = await accounts.create(db, name, active=active)
    app = await apps.create(db, account_id, f"{name} app")
    await domains.add(db, services.box, account_id, domain, verified=verified)
    if sender is not None:
        await domains.add_sender(db, account_id, f"{sender}@{domain}")
    key = await keys.create(
        db,
        services.box,
        account_id,
        name="test",
        signing=signing,
        require_signature=require_signature,
    )
    return Tenant(account_id, app.app_id, key.api_key, key.signing_secret, key.prefix)


@pytest.fixture
async def tenant(services: Services) -> Tenant:
    return await make_tenant(services)


SEND_EXAMPLE = {
    "from": "from@example.com",
    "to": "to@example.com",
    "subject": "test send",
    "body": "test content",
}


def assert_envelope(payload: dict[str, Any], code: int) -> None:
    assert set(payload) == {"requestId", "code", "success", "message", "ts", "data"}
    assert payload["code"] == code
    assert payload["success"] is (code == 0)
    uuid.UUID(payload["requestId"], version=4)
    assert isinstance(payload["ts"], int) and payload["ts"] > 1_600_000_000_000
    assert isinstance(payload["message"], str) and payload["message"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
