"""`sendkit serve`: migrate, then run uvicorn with the app (and, later, workers)."""

from __future__ import annotations

import asyncio

import uvicorn

from sendkit import logs
from sendkit.config import Settings
from sendkit.db import Database
from sendkit.migrate import migrate
from sendkit.web.app import create_app


async def _migrate(settings: Settings) -> None:
    db = Database(settings.db_url)
    try:
        await migrate(db)
    finally:
        await db.dispose()


def serve(settings: Settings) -> None:
    logs.configure(json=settings.json_logs, level=settings.log_level)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(_migrate(settings))
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        access_log=False,
        log_config=None,
        server_header=False,
    )
    uvicorn.Server(config).run()
