"""Typed settings, built once at start and passed down (no import-time globals)."""

from __future__ import annotations

import secrets
import socket
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
    db_lock_timeout: float = Field(
        5.0,
        description="Seconds a write waits for a locked database before the API answers 503.",
    )
    cache_seconds: float = Field(
        2.0,
        description="How long API keys and sender checks are cached; another process's "
        "changes (revoked key, new plan, new sender) take effect within this time.",
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
    web_processes: int = Field(
        1,
        ge=1,
        le=64,
        description="Processes `sendkit serve` runs (API and, with `workers`, delivery in "
        "each), sharing one listening socket. More than 1 needs `redis_url`: rate limits "
        "and replay protection must be shared between them.",
    )
    workers: bool = Field(True, description="Run delivery workers inside `sendkit serve`.")
    worker_processes: int = Field(
        0,
        ge=0,
        le=64,
        description="Delivery processes `sendkit serve` starts beside its API processes, "
        "at `worker_niceness` (0: delivery runs inside the API processes, as `workers` "
        "says). A burst of API requests then gets the CPU first; the queue drains after.",
    )
    worker_niceness: int = Field(
        10, ge=0, le=19, description="How much lower the delivery processes' CPU priority is."
    )
    # As Postfix's default_process_limit. With signing in a process of its own, slots
    # spend part of their time waiting for a batch's signatures: 100 delivered ~20 % more
    # than 50 here (bench/README.md, fifth round).
    worker_concurrency: int = Field(100, description="Messages each worker sends at once.")
    signing_processes: int = Field(
        1,
        ge=0,
        le=64,
        description="Processes beside each delivery process that compute DKIM signatures "
        "(0: threads of the delivery process).",
    )
    lease_seconds: float = Field(
        900, description="How long a claimed message stays with its worker before reclaim."
    )
    poll_interval: float = Field(0.5, description="Seconds between queue polls when idle.")
    shutdown_timeout: float = Field(
        30, description="On SIGTERM, seconds in-flight SMTP transactions may take to finish."
    )
    retry_schedule: str | None = Field(
        None,
        description="Retry delays, e.g. '300,1500,1800,3600,7200,10800;give_up=432000' "
        "(seconds). Default: about 5 min, 25 min, 30 min, 1 h, 2 h, then every 3 h, "
        "for 5 days.",
    )
    ehlo_name: str = Field(
        default_factory=socket.getfqdn, description="Name this server gives in EHLO."
    )
    mail_host: str | None = Field(
        None, description="Host name published in SPF and return-path MX records (EHLO name)."
    )
    dkim_selector: str = Field("sendkit", description="DKIM selector for new domains.")
    return_path_subdomain: str = Field(
        "bounces", description="Bounces go to <prefix>+<id>@<this>.<sending domain>."
    )
    relay_host: str = Field("127.0.0.1", description="Smarthost for SENDKIT_DELIVERY=relay.")
    relay_port: int = Field(25, description="Smarthost port.")
    relay_username: str | None = Field(None, description="Smarthost AUTH user.")
    relay_password: str | None = Field(None, description="Smarthost AUTH password.")
    relay_tls: Literal["none", "starttls", "tls"] = Field(
        "none", description="TLS to the smarthost."
    )
    direct_port: int = Field(25, description="Port of remote MX hosts (tests change it).")
    max_connections_per_destination: int = Field(
        10, description="Open SMTP connections per destination at most."
    )
    smtp_timeout: float | None = Field(
        None, description="Override every SMTP timeout (seconds); default RFC 5321 values."
    )

    # --- dashboard ------------------------------------------------------------------------
    system_from: str = Field(
        "SendKit <no-reply@sendkit.example>",
        description="From of the emails SendKit itself sends (activation, password reset), "
        "through its system account; its domain is verified for that account automatically.",
    )
    signup_enabled: bool = Field(
        True, description="Let anyone who reaches the dashboard sign up for an account."
    )
    session_hours: int = Field(
        24 * 14, description="How long a dashboard login lasts before signing in again."
    )
    activation_hours: int = Field(72, description="How long an account activation link works.")
    reset_minutes: int = Field(60, description="How long a password reset link works.")
    login_attempts_per_minute: int = Field(
        5, description="Dashboard login attempts allowed per email address and client address."
    )
    import_max_bytes: int = Field(
        200 * 1024 * 1024,
        description="Largest CSV file the dashboard accepts for a contact import.",
    )
    dns_nameserver: str | None = Field(
        None,
        description="'host' or 'host:port' of the DNS server that domain verification asks "
        "(tests point it at a local one). Default: the system's resolvers.",
    )

    # --- events, webhooks, SMTP server -----------------------------------------------------
    webhook_allow_cidrs: str = Field(
        "",
        description="Comma-separated address ranges webhooks may reach although they are not "
        "public (e.g. '127.0.0.0/8,::1/128' for tests). Default: public addresses only.",
    )
    webhook_timeout: float = Field(10, description="Seconds one webhook POST may take in all.")
    webhook_retry_schedule: str | None = Field(
        None,
        description="Webhook retry delays in the retry_schedule format. Default: 5 s, 5 min, "
        "30 min, 2 h, 5 h, 10 h, 10 h (8 attempts).",
    )
    webhook_concurrency: int = Field(10, description="Webhook POSTs in flight per worker.")
    smtpd_host: str = Field("127.0.0.1", description="Address `sendkit smtpd` listens on.")
    smtpd_port: int = Field(2525, description="Port `sendkit smtpd` listens on.")
    smtpd_tls_cert: Path | None = Field(
        None, description="PEM certificate chain for STARTTLS; with it, AUTH requires TLS."
    )
    smtpd_tls_key: Path | None = Field(None, description="PEM private key for STARTTLS.")
    smtpd_max_message_size: int = Field(
        25 * 1024 * 1024,
        description="Largest message `sendkit smtpd` reads (bounces included); submissions "
        "are further held to the account's plan.",
    )

    @model_validator(mode="after")
    def _refuse_default_secret_in_production(self) -> Settings:
        if self.environment == "production" and not self.secret_key:
            raise ValueError("SENDKIT_SECRET_KEY must be set when SENDKIT_ENVIRONMENT=production")
        return self

    @model_validator(mode="after")
    def _shared_state_for_several_processes(self) -> Settings:
        if self.web_processes > 1 and not self.redis_url:
            raise ValueError(
                "SENDKIT_WEB_PROCESSES > 1 needs SENDKIT_REDIS_URL: rate limits and replay "
                "protection must be shared between the processes"
            )
        return self

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'sendkit.db').resolve()}"

    @property
    def is_sqlite(self) -> bool:
        return self.db_url.startswith("sqlite")

    def public_url(self) -> str:
        """Where people reach this server, for links in emails: `base_url` when it was set,
        else the address `sendkit serve` listens on."""
        if "base_url" in self.model_fields_set:
            return self.base_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host  # noqa: S104
        return f"http://{host}:{self.port}"

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
