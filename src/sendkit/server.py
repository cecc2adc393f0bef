"""`sendkit serve`: migrate, then run uvicorn with the app (and workers), in one process or
in `web_processes` processes sharing the listening socket."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import typer
import uvicorn
from fastapi import FastAPI

from sendkit import accounts, logs
from sendkit import services as services_mod
from sendkit.config import Settings
from sendkit.migrate import migrate
from sendkit.web.app import create_app


async def _prepare(settings: Settings, init_demo: bool) -> dict[str, str] | None:
    """Migrate; on the very first start with `init_demo`, create the demo account."""
    services = services_mod.build(settings)
    try:
        await migrate(services.db)
        if not init_demo or await accounts.find_demo(services.db) is not None:
            return None
        from sendkit.cli import ensure_demo

        return {k: str(v) for k, v in (await ensure_demo(services)).items()}
    finally:
        await services.close()


def _banner(settings: Settings, demo: dict[str, str]) -> str:
    base = f"http://{settings.host}:{settings.port}"
    return f"""
SendKit is starting with a demo account (shown once; keep it):
  API key          {demo["apiKey"]}
  signing secret   {demo["signingSecret"]}
  appId            {demo["appId"]}
  dashboard login  {demo.get("dashboardEmail", "")} / {demo.get("dashboardPassword", "")}
  data directory   {settings.data_dir.resolve()}

Try it:
  curl -X POST {base}/v1/send \\
    -H "Content-Type: application/json; charset=utf-8" \\
    -H "Authorization: Bearer {demo["apiKey"]}" \\
    -d '{{"from": "from@example.com", "to": "to@example.com",
         "subject": "test send", "body": "test content"}}'

Delivery mode: {settings.delivery} (nothing leaves this machine in sandbox mode).
Look a message up:  .venv/bin/sendkit messages show <X-Message-Id> --data-dir {settings.data_dir}
Dashboard:          {base}/ (the dashboard login above)
API docs:           {base}/docs
"""


# Several processes: the parent hands its exact settings to each child (spawned, so it
# imports this module afresh) through the environment.
_SETTINGS_ENV = "SENDKIT_SERVE_SETTINGS_JSON"


def app_from_environment() -> FastAPI:
    """The app of one of several `sendkit serve` processes (a uvicorn factory)."""
    settings = Settings.model_validate_json(os.environ[_SETTINGS_ENV])
    logs.configure(json=settings.json_logs, level=settings.log_level, with_pid=True)
    return create_app(settings)


def serve(settings: Settings, *, init_demo: bool = False) -> None:
    logs.configure(json=settings.json_logs, level=settings.log_level)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    demo = asyncio.run(_prepare(settings, init_demo))
    if demo is not None:
        typer.echo(_banner(settings, demo))
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "access_log": False,
        "log_config": None,
        "server_header": False,
    }
    if settings.web_processes == 1:
        uvicorn.Server(uvicorn.Config(create_app(settings), **options)).run()
        return
    # Unset fields stay unset in the children: defaults like `base_url` depend on it.
    os.environ[_SETTINGS_ENV] = settings.model_dump_json(exclude_unset=True)
    uvicorn.run(
        f"{__name__}:app_from_environment",
        factory=True,
        workers=settings.web_processes,
        **options,
    )
