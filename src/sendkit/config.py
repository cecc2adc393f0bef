"""Typed settings, built once at start and passed down (no import-time globals)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every field reads the environment variable `SENDKIT_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="SENDKIT_", extra="ignore")

    environment: Literal["development", "production", "test"] = Field(
        "development", description="`production` refuses to start without a real secret key."
    )
    data_dir: Path = Field(
        Path(".sendkit"), description="Where the SQLite database, secret key and inbox live."
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL, e.g. postgresql+asyncpg://user@host/db. "
        "Default: SQLite at <data_dir>/sendkit.db.",
    )
    redis_url: str | None = Field(
        None, description="redis://host:port/db for shared rate limits and replay protection."
    )
    secret_key: str | None = Field(
        None,
        description="Encrypts signing secrets and signs tokens. Default: generated once "
        "into <data_dir>/secret_key. Required in production and with several processes.",
    )
    host: str = Field("127.0.0.1", description="Address `sendkit serve` listens on.")
    port: int = Field(8000, description="Port `sendkit serve` listens on.")
    base_url: str = Field(
        "http://127.0.0.1:8000", description="Public URL of this server, used in links."
    )
    signature_window: int = Field(
        300, description="Seconds a signed request's timestamp may differ from server time."
    )
    json_logs: bool = Field(True, description="Log JSON lines (false: human-readable).")
    log_level: str = Field("INFO", description="Python logging level.")
    body_overhead: int = Field(
        64 * 1024,
        description="Bytes of JSON framing allowed on top of the plan's max message size.",
    )
    delivery: Literal["sandbox", "relay", "direct"] = Field(
        "sandbox", description="Where queued messages go: local inbox, smarthost or MX."
    )
    workers: bool = Field(True, description="Run delivery workers inside `sendkit serve`.")

    @model_validator(mode="after")
    def _refuse_default_secret_in_production(self) -> Settings:
        if self.environment == "production" and not self.secret_key:
            raise ValueError("SENDKIT_SECRET_KEY must be set when SENDKIT_ENVIRONMENT=production")
        return self

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'sendkit.db').resolve()}"

    @property
    def is_sqlite(self) -> bool:
        return self.db_url.startswith("sqlite")

    def resolved_secret_key(self) -> str:
        """The configured key, or one generated once and kept in the data directory."""
        if self.secret_key:
            return self.secret_key
        path = self.data_dir / "secret_key"
        if path.exists():
            return path.read_text().strip()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(32)
        path.touch(mode=0o600)
        path.write_text(key)
        return key
