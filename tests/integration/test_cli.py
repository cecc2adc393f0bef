"""The `sendkit` command line, in process, on SQLite (`--data-dir`) and on PostgreSQL
(`SENDKIT_DATABASE_URL`). These tests are synchronous: each command runs its own loop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import sqlalchemy as sa
import structlog
from click.testing import Result
from typer.testing import CliRunner

from sendkit import accounts, apps, keys
from sendkit import services as services_mod
from sendkit.cli import app as cli_app
from sendkit.config import Settings
from sendkit.db import domains as domains_table
from sendkit.db import senders as senders_table
from sendkit.errors import InvalidSignature
from sendkit.services import Services
from sendkit.web.app import create_app
from tests.conftest import SEND_EXAMPLE, make_settings

T = TypeVar("T")
SECRET_KEY = "cli-test-secret-key"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI configures structlog onto the runner's captured stderr; put it back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


class Cli:
    def __init__(self, backend: str, database_url: str, data_dir: Path) -> None:
        self.backend = backend
        self.database_url = database_url
        self.data_dir = data_dir
        self.runner = CliRunner()

    @property
    def env(self) -> dict[str, str | None]:
        url = self.database_url if self.backend == "postgres" else None
        return {"SENDKIT_DATABASE_URL": url, "SENDKIT_SECRET_KEY": SECRET_KEY}

    def __call__(self, *args: str, data_dir: Path | None = None) -> Result:
        argv = [*args, "--data-dir", str(data_dir or self.data_dir)]
        return self.runner.invoke(cli_app, argv, env=self.env)

    def ok(self, *args: str) -> Result:
        result = self(*args)
        assert result.exit_code == 0, (args, result.output, result.exception)
        return result

    def json(self, *args: str) -> dict[str, Any]:
        result = self.ok(*args, "--json")
        payload: dict[str, Any] = json.loads(result.stdout)
        return payload

    def fails(self, *args: str) -> Result:
        result = self(*args)
        assert result.exit_code == 1, (args, result.output, result.exception)
        assert result.stderr.startswith("error: "), result.stderr
        assert "Traceback" not in result.output
        return result

    def settings(self) -> Settings:
        # The same database and secret key the commands used.
        return make_settings(self.data_dir.parent, self.database_url, secret_key=SECRET_KEY)

    def with_services(self, action: Callable[[Services], Awaitable[T]]) -> T:
        async def go() -> T:
            services = services_mod.build(self.settings())
            try:
                return await action(services)
            finally:
                await services.close()

        return asyncio.run(go())

    def authenticate(self, token: str) -> keys.AuthenticatedKey:
        return self.with_services(lambda s: keys.authenticate(s.db, s.box, token))

    def account(self, account_id: str) -> accounts.Account:
        return self.with_services(lambda s: accounts.load(s.db, account_id))

    def api(self, calls: Callable[[httpx.AsyncClient], Awaitable[T]]) -> T:
        """Requests against the app, with these settings, in process."""

        async def action(services: Services) -> T:
            app = create_app(self.settings(), services)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://cli.test") as c:
                return await calls(c)

        return self.with_services(action)


@pytest.fixture
def cli(backend: str, database_url: str, tmp_path: Path) -> Cli:
    # For SQLite, database_url is <tmp_path>/data/sendkit.db: the default under --data-dir.
    data_dir = tmp_path / "data"
    if backend == "sqlite":
        assert database_url.endswith(str(data_dir / "sendkit.db"))
    return Cli(backend, database_url, data_dir)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- migrate and init --------------------------------------------------------------


def test_migrate_is_idempotent(cli: Cli) -> None:
    for _ in range(2):
        assert "database is up to date" in cli.ok("migrate").stdout


def test_commands_create_a_missing_data_dir(tmp_path: Path) -> None:
    """SQLite, a data directory that does not exist yet, SENDKIT_SECRET_KEY set."""
    fresh = tmp_path / "fresh" / "data"
    cli = Cli("sqlite", f"sqlite+aiosqlite:///{fresh / 'sendkit.db'}", fresh)
    result = cli("migrate")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "database is up to date" in result.stdout
    assert (fresh / "sendkit.db").is_file()
    account_id = cli.json("account", "create", "--name", "First")["accountId"]
    assert cli.account(account_id).name == "First"


def test_init_demo_is_idempotent_and_both_keys_work(cli: Cli) -> None:
    first = cli.json("init", "--demo")
    assert {"apiKey", "appId", "signingSecret", "accountId"} <= set(first)
    assert first["apiKey"].startswith("sk_")
    assert first["signingSecret"].startswith("ss_")
    assert first["appId"].isdigit()

    second = cli.json("init", "--demo")
    assert second["accountId"] == first["accountId"]
    assert second["appId"] == first["appId"]
    assert second["apiKey"] != first["apiKey"]
    assert second["signingSecret"] != first["signingSecret"]

    for created in (first, second):
        key = cli.authenticate(created["apiKey"])
        assert key.account.id == first["accountId"]
        assert key.account.active
        assert key.signing_secret == created["signingSecret"]

    owned = cli.with_services(lambda s: apps.list_for_account(s.db, first["accountId"]))
    assert [a.app_id for a in owned] == [first["appId"]]

    async def calls(client: httpx.AsyncClient) -> list[httpx.Response]:
        out = []
        for created in (first, second):
            out.append(
                await client.get(
                    "/v1/contact",
                    params={"appId": first["appId"]},
                    headers=bearer(created["apiKey"]),
                )
            )
        out.append(
            await client.post("/v1/send", json=SEND_EXAMPLE, headers=bearer(first["apiKey"]))
        )
        return out

    for response in cli.api(calls):
        assert response.status_code == 200, response.text
        assert response.json()["code"] == 0


def test_init_without_demo_does_nothing(cli: Cli) -> None:
    result = cli("init")
    assert result.exit_code != 0
    assert "--demo" in result.stderr


# --- accounts ----------------------------------------------------------------------


def test_account_create_activate_and_set_plan(cli: Cli) -> None:
    created = cli.json("account", "create", "--name", "Acme")
    account_id = created["accountId"]
    account = cli.account(account_id)
    assert account.name == "Acme" and account.active

    dormant = cli.json("account", "create", "--name", "Dormant", "--inactive")["accountId"]
    assert dormant != account_id
    assert not cli.account(dormant).active
    activated = cli.ok("account", "activate", dormant)
    assert dormant in activated.stdout
    assert cli.account(dormant).active

    plan = cli.json(
        "account",
        "set-plan",
        account_id,
        "--rate",
        "2",
        "--daily",
        "3",
        "--max-size",
        "1000",
        "--expires",
        "2030-01-01",
    )
    assert plan == {
        "accountId": account_id,
        "rate": 2,
        "daily": 3,
        "maxSize": 1000,
        "expires": "2030-01-01",
    }
    account = cli.account(account_id)
    assert (account.rate_per_second, account.daily_limit, account.max_message_size) == (2, 3, 1000)
    assert account.expires_on == "2030-01-01"

    # Options not given keep their values.
    partial = cli.json("account", "set-plan", account_id, "--daily", "7")
    assert partial["rate"] == 2 and partial["daily"] == 7 and partial["expires"] == "2030-01-01"


def test_account_errors_exit_1_with_a_message(cli: Cli) -> None:
    missing = "0" * 32
    result = cli.fails("account", "activate", missing)
    assert "not found" in result.stderr.lower()
    result = cli.fails("account", "set-plan", missing, "--rate", "2")
    assert "not found" in result.stderr.lower()

    account_id = cli.json("account", "create", "--name", "Acme")["accountId"]
    for bad in ("2030-13-01", "01/01/2030", "tomorrow"):
        result = cli.fails("account", "set-plan", account_id, "--expires", bad)
        assert "expires" in result.stderr
    result = cli.fails("account", "set-plan", account_id, "--rate", "0")
    assert "rate" in result.stderr
    assert cli.account(account_id).expires_on is None
    assert cli.account(account_id).rate_per_second == 5


# --- keys, apps, domains, senders --------------------------------------------------


def test_key_create_and_revoke(cli: Cli) -> None:
    account_id = cli.json("account", "create", "--name", "Acme")["accountId"]
    created = cli.json("key", "create", "--account", account_id, "--signing", "--require-signature")
    assert created["apiKey"].startswith("sk_")
    assert created["signingSecret"].startswith("ss_")
    assert created["prefix"] == created["apiKey"][: len(created["prefix"])]
    assert len(created["prefix"]) < len(created["apiKey"])

    key = cli.authenticate(created["apiKey"])
    assert key.account.id == account_id
    assert key.require_signature
    assert key.signing_secret == created["signingSecret"]

    plain = cli.json("key", "create", "--account", account_id, "--name", "plain")
    assert plain["signingSecret"] is None
    assert cli.authenticate(plain["apiKey"]).signing_secret is None

    revoked = cli.ok("key", "revoke", created["prefix"])
    assert created["prefix"] in revoked.stdout
    with pytest.raises(InvalidSignature):
        cli.authenticate(created["apiKey"])
    # The other key is untouched; revoking twice is an error.
    assert cli.authenticate(plain["apiKey"]).account.id == account_id
    cli.fails("key", "revoke", created["prefix"])
    cli.fails("key", "revoke", "sk_nothing")


def test_key_and_app_for_an_unknown_account_fail(cli: Cli) -> None:
    missing = "f" * 32
    result = cli.fails("key", "create", "--account", missing, "--json")
    assert result.stdout == ""
    assert "not found" in result.stderr.lower()
    result = cli.fails("app", "create", "--account", missing, "--name", "X", "--json")
    assert result.stdout == ""
    cli.fails("domain", "add", "example.org", "--account", missing)


def test_provisioned_account_can_use_the_api(cli: Cli) -> None:
    account_id = cli.json("account", "create", "--name", "Shop", "--inactive")["accountId"]
    cli.ok("account", "activate", account_id)
    app_id = cli.json("app", "create", "--account", account_id, "--name", "Shop app")["appId"]
    assert app_id.isdigit()
    owned = cli.with_services(lambda s: apps.list_for_account(s.db, account_id))
    assert [(a.app_id, a.name) for a in owned] == [(app_id, "Shop app")]

    added = cli.ok("domain", "add", "Shop.Example", "--account", account_id, "--verified")
    assert "shop.example" in added.stdout and "verified" in added.stdout
    sender = cli.ok("sender", "add", "News@Shop.Example", "--account", account_id)
    assert "added" in sender.stdout
    # A sender on a domain the account does not have is refused.
    cli.fails("sender", "add", "x@elsewhere.example", "--account", account_id)
    key = cli.json("key", "create", "--account", account_id)["apiKey"]

    async def rows(services: Services) -> tuple[list[Any], list[Any]]:
        async with services.db.read() as conn:
            domains = (
                await conn.execute(
                    sa.select(domains_table.c.name, domains_table.c.verified).where(
                        domains_table.c.account_id == account_id
                    )
                )
            ).all()
            senders = (
                await conn.execute(
                    sa.select(senders_table.c.address).where(
                        senders_table.c.account_id == account_id
                    )
                )
            ).all()
        return [tuple(r) for r in domains], [tuple(r) for r in senders]

    assert cli.with_services(rows) == ([("shop.example", True)], [("news@shop.example",)])

    async def calls(client: httpx.AsyncClient) -> list[httpx.Response]:
        contact = {"appId": app_id, "emailAddress": "c@example.com", "status": "Confirmed"}
        mail = {**SEND_EXAMPLE, "from": "news@shop.example"}
        stranger = {**SEND_EXAMPLE, "from": "other@shop.example"}
        return [
            await client.post("/v1/contact", json=contact, headers=bearer(key)),
            await client.post("/v1/send", json=mail, headers=bearer(key)),
            await client.post("/v1/send", json=stranger, headers=bearer(key)),
        ]

    saved, sent, refused = cli.api(calls)
    assert saved.json()["code"] == 0, saved.text
    assert sent.json()["code"] == 0, sent.text
    assert refused.json()["code"] == 100048, refused.text


def test_inactive_account_made_by_the_cli_is_refused(cli: Cli) -> None:
    account_id = cli.json("account", "create", "--name", "Later", "--inactive")["accountId"]
    key = cli.json("key", "create", "--account", account_id)["apiKey"]
    app_id = cli.json("app", "create", "--account", account_id, "--name", "A")["appId"]

    async def calls(client: httpx.AsyncClient) -> httpx.Response:
        return await client.get("/v1/contact", params={"appId": app_id}, headers=bearer(key))

    assert cli.api(calls).json()["code"] == 100049
    cli.ok("account", "activate", account_id)
    assert cli.api(calls).json()["code"] == 0
