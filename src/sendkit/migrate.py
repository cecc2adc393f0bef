"""Bring a database to the newest schema with Alembic, from any process, at any time."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection

from sendkit.db import Database

# Any constant works; it only has to be the same in every SendKit process.
_PG_LOCK_ID = 0x53454E44


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", "sendkit:migrations")
    return cfg


def _upgrade(conn: Connection) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = conn
    # "heads": features may add migrations on separate branches of the history.
    command.upgrade(cfg, "heads")


async def migrate(db: Database) -> None:
    """Upgrade to head; on PostgreSQL an advisory lock keeps concurrent starts apart."""
    async with db.engine.connect() as conn:
        if not db.is_sqlite:
            await conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_ID})
        try:
            await conn.run_sync(_upgrade)
            await conn.commit()
        finally:
            if not db.is_sqlite:
                await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_ID})
                await conn.commit()
