"""Typer app. Each command parses its options, calls one domain function, prints."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from sendkit import accounts, apps, domains, keys, logs
from sendkit import messages as messages_mod
from sendkit import services as services_mod
from sendkit.config import Settings
from sendkit.delivery.sandbox import raw_message
from sendkit.errors import SendKitError
from sendkit.migrate import migrate as run_migrations
from sendkit.services import Services

T = TypeVar("T")

app = typer.Typer(no_args_is_help=True, add_completion=False, help="SendKit email delivery.")
account_app = typer.Typer(no_args_is_help=True, help="Accounts and their plans.")
key_app = typer.Typer(no_args_is_help=True, help="API keys.")
app_app = typer.Typer(no_args_is_help=True, help="Applications (appId).")
domain_app = typer.Typer(no_args_is_help=True, help="Sending domains.")
sender_app = typer.Typer(no_args_is_help=True, help="Sender addresses.")
messages_app = typer.Typer(no_args_is_help=True, help="The message log.")
for sub, name in (
    (account_app, "account"),
    (key_app, "key"),
    (app_app, "app"),
    (domain_app, "domain"),
    (sender_app, "sender"),
    (messages_app, "messages"),
):
    app.add_typer(sub, name=name)

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Data directory (default ./.sendkit or SENDKIT_DATA_DIR)."),
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
AccountOpt = Annotated[str, typer.Option("--account", help="Account id.")]


def settings_for(data_dir: Path | None, **overrides: Any) -> Settings:
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    return Settings(**overrides)


def run(data_dir: Path | None, action: Callable[[Services], Awaitable[T]]) -> T:
    """Open the services, make sure the schema is current, run one action, close."""
    settings = settings_for(data_dir)
    logs.configure(json=settings.json_logs, level="WARNING")
    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)

    async def go() -> T:
        services = services_mod.build(settings)
        try:
            await run_migrations(services.db)
            return await action(services)
        finally:
            await services.close()

    try:
        return asyncio.run(go())
    except SendKitError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None


def emit(as_json: bool, payload: dict[str, Any], text: str) -> None:
    typer.echo(json.dumps(payload) if as_json else text)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Listen address.")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port.")] = None,
    init_demo: Annotated[
        bool, typer.Option("--init-demo", help="On first start, create the demo account.")
    ] = False,
    data_dir: DataDir = None,
) -> None:
    """Serve the API (and delivery workers) in one process; migrates first."""
    from sendkit.server import serve as run_server

    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    run_server(settings_for(data_dir, **overrides), init_demo=init_demo)


@app.command()
def worker(
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", help="Messages in flight at once.")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Run delivery workers alone (several may share one PostgreSQL)."""
    from sendkit.delivery.runner import run_process

    settings = settings_for(data_dir)
    logs.configure(json=settings.json_logs, level=settings.log_level)
    run_process(settings, concurrency=concurrency)


@app.command()
def smtpd(
    host: Annotated[str | None, typer.Option(help="Listen address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (default 2525).")] = None,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="PEM certificate chain for STARTTLS.")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="PEM private key for STARTTLS.")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """SMTP submission (AUTH with an API key) and the bounce/complaint receiver."""
    from sendkit.smtpd.server import run as run_smtpd

    overrides: dict[str, Any] = {}
    for name, value in (
        ("smtpd_host", host),
        ("smtpd_port", port),
        ("smtpd_tls_cert", tls_cert),
        ("smtpd_tls_key", tls_key),
    ):
        if value is not None:
            overrides[name] = value
    settings = settings_for(data_dir, **overrides)
    logs.configure(json=settings.json_logs, level=settings.log_level)
    asyncio.run(run_smtpd(settings))


@app.command()
def migrate(data_dir: DataDir = None) -> None:
    """Bring the database schema up to date."""

    async def action(_: Services) -> None:
        return None

    run(data_dir, action)
    typer.echo("database is up to date")


@app.command()
def init(
    demo: Annotated[bool, typer.Option("--demo", help="Create the demo account.")] = False,
    as_json: Json = False,
    data_dir: DataDir = None,
) -> None:
    """Create (or find) the demo account and print a new API key for it."""
    if not demo:
        typer.echo("nothing to do: pass --demo", err=True)
        raise typer.Exit(2)
    result = run(data_dir, ensure_demo)
    emit(
        as_json,
        result,
        "\n".join(f"{k}: {v}" for k, v in result.items() if v is not None),
    )


async def ensure_demo(services: Services) -> dict[str, Any]:
    """The demo account with an app, a verified example.com accepting any sender, and a
    fresh signing key. Idempotent: a second run reuses the account and adds a key."""
    db = services.db
    account_id = await accounts.find_demo(db)
    created = account_id is None
    if account_id is None:
        account_id = await accounts.create(db, "Demo", active=True, is_demo=True)
    app_list = await apps.list_for_account(db, account_id)
    app = app_list[0] if app_list else await apps.create(db, account_id, "Demo app")
    await domains.add(
        db,
        services.box,
        account_id,
        "example.com",
        verified=True,
        selector=services.settings.dkim_selector,
    )
    await domains.add_sender(db, account_id, "*@example.com")
    key = await keys.create(db, services.box, account_id, name="demo", signing=True)
    result: dict[str, Any] = {
        "apiKey": key.api_key,
        "appId": app.app_id,
        "signingSecret": key.signing_secret,
        "accountId": account_id,
        "created": created,
    }
    if created:
        email = "admin@example.com"
        password = secrets.token_urlsafe(12)
        await accounts.create_user(db, account_id, email, password, is_operator=True)
        result["dashboardEmail"] = email
        result["dashboardPassword"] = password
    return result


@account_app.command("create")
def account_create(
    name: Annotated[str, typer.Option("--name")],
    inactive: Annotated[bool, typer.Option("--inactive")] = False,
    as_json: Json = False,
    data_dir: DataDir = None,
) -> None:
    account_id = run(data_dir, lambda s: accounts.create(s.db, name, active=not inactive))
    emit(as_json, {"accountId": account_id}, account_id)


@account_app.command("activate")
def account_activate(account_id: str, data_dir: DataDir = None) -> None:
    run(data_dir, lambda s: accounts.set_active(s.db, account_id, True))
    typer.echo(f"account {account_id} activated")


@account_app.command("set-plan")
def account_set_plan(
    account_id: str,
    rate: Annotated[int | None, typer.Option("--rate", help="Requests per second.")] = None,
    daily: Annotated[int | None, typer.Option("--daily", help="Sends per UTC day.")] = None,
    max_size: Annotated[int | None, typer.Option("--max-size", help="Bytes.")] = None,
    expires: Annotated[str | None, typer.Option("--expires", help="YYYY-MM-DD.")] = None,
    as_json: Json = False,
    data_dir: DataDir = None,
) -> None:
    account = run(
        data_dir,
        lambda s: accounts.set_plan(
            s.db, account_id, rate=rate, daily=daily, max_size=max_size, expires=expires
        ),
    )
    plan = {
        "accountId": account.id,
        "rate": account.rate_per_second,
        "daily": account.daily_limit,
        "maxSize": account.max_message_size,
        "expires": account.expires_on,
    }
    emit(as_json, plan, " ".join(f"{k}={v}" for k, v in plan.items()))


@key_app.command("create")
def key_create(
    account: AccountOpt,
    name: Annotated[str, typer.Option("--name")] = "default",
    signing: Annotated[bool, typer.Option("--signing")] = False,
    require_signature: Annotated[bool, typer.Option("--require-signature")] = False,
    as_json: Json = False,
    data_dir: DataDir = None,
) -> None:
    key = run(
        data_dir,
        lambda s: keys.create(
            s.db,
            s.box,
            account,
            name=name,
            signing=signing,
            require_signature=require_signature,
        ),
    )
    payload = {"apiKey": key.api_key, "signingSecret": key.signing_secret, "prefix": key.prefix}
    emit(as_json, payload, "\n".join(f"{k}: {v}" for k, v in payload.items() if v))


@key_app.command("revoke")
def key_revoke(prefix: str, data_dir: DataDir = None) -> None:
    run(data_dir, lambda s: keys.revoke(s.db, prefix))
    typer.echo(f"key {prefix} revoked")


@app_app.command("create")
def app_create(
    account: AccountOpt,
    name: Annotated[str, typer.Option("--name")],
    as_json: Json = False,
    data_dir: DataDir = None,
) -> None:
    created = run(data_dir, lambda s: apps.create(s.db, account, name))
    emit(as_json, {"appId": created.app_id}, created.app_id)


@domain_app.command("add")
def domain_add(
    name: str,
    account: AccountOpt,
    verified: Annotated[bool, typer.Option("--verified")] = False,
    as_json: Json = False,
    data_dir: DataDir = None,
) -> None:
    domain = run(
        data_dir,
        lambda s: domains.add(
            s.db, s.box, account, name, verified=verified, selector=s.settings.dkim_selector
        ),
    )
    emit(
        as_json,
        {"domain": domain.name, "verified": domain.verified},
        f"domain {domain.name} added" + (" (verified)" if domain.verified else ""),
    )


@domain_app.command("records")
def domain_records(
    name: str, account: AccountOpt, as_json: Json = False, data_dir: DataDir = None
) -> None:
    """The DNS records to publish for a domain (the DKIM private key is never printed)."""
    records = run(
        data_dir,
        lambda s: domains.dns_records(
            s.db,
            s.box,
            account,
            name,
            mail_host=s.settings.mail_host or s.settings.ehlo_name,
            return_path_subdomain=s.settings.return_path_subdomain,
        ),
    )
    text = "\n".join(f"{r['type']:4} {r['name']}  {r['value']}" for r in records)
    emit(as_json, {"records": records}, text)


@sender_app.command("add")
def sender_add(address: str, account: AccountOpt, data_dir: DataDir = None) -> None:
    stored = run(data_dir, lambda s: domains.add_sender(s.db, account, address))
    typer.echo(f"sender {stored if stored != '*' else address} added")


@messages_app.command("show")
def messages_show(
    ident: str,
    raw: Annotated[bool, typer.Option("--raw", help="Print the delivered source only.")] = False,
    as_json: Json = False,
    data_dir: DataDir = None,
) -> None:
    """A message by id or requestId: status, attempts, and the sandbox copy if any."""

    async def action(s: Services) -> dict[str, Any] | None:
        found = await messages_mod.find(s.db, ident)
        if found is not None:
            source = await raw_message(s.db, found["id"])
            found["raw"] = source.decode("utf-8", "replace") if source is not None else None
        return found

    found = run(data_dir, action)
    if found is None:
        typer.echo("error: message not found", err=True)
        raise typer.Exit(1)
    if raw:
        typer.echo(found["raw"] or "", nl=False)
        return
    found["attempts"] = found.pop("attempts_log")
    emit(as_json, found, _describe_message(found))


def _describe_message(found: dict[str, Any]) -> str:
    lines = [f"{k}: {v}" for k, v in found.items() if k not in ("attempts", "raw")]
    for attempt in found["attempts"]:
        lines.append(
            f"attempt: {attempt['outcome']} {attempt['code']} {attempt['host']} {attempt['text']}"
        )
    if found["raw"]:
        lines += ["", found["raw"]]
    return "\n".join(lines)


def main() -> None:
    app()
