"""The SendKit side: a deployment (data dir, database, settings), `sendkit serve` on a free
port, and an in-process admin that calls SendKit's public functions on the same database
(migrate, the demo account, the plan, queue counts, enqueueing, CSV imports)."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import sys
import time
import uuid
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from benchkit import procs

T = TypeVar("T")

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
RATE_PER_SECOND = 1_000_000
_CHUNK = 200  # messages submitted at once: a few group commits, and a fine deadline
DAILY_LIMIT = 100_000_000
REDIS_URL = f"redis://{procs.LOOPBACK}:6379/15"


def serve_processes(wanted: int) -> int:
    """`wanted` when the local Redis answers (several processes share limits through it)."""
    if wanted <= 1:
        return 1
    try:
        with socket.create_connection((procs.LOOPBACK, 6379), 1.0):
            return wanted
    except OSError:
        print("Redis does not answer on 6379: sendkit serve runs one process", flush=True)
        return 1


SENDER, RECIPIENT = "from@example.com", "to@example.com"


@dataclass(frozen=True)
class Demo:
    account_id: str
    app_id: str
    api_key: str


@dataclass
class Deployment:
    """One SendKit installation: its data directory and database, relaying to `relay_port`."""

    name: str
    data_dir: Path
    relay_port: int
    database_url: str | None = None  # None: SQLite in the data directory (the default)
    secret_key: str = ""
    processes: int = 1  # SENDKIT_WEB_PROCESSES; more than 1 uses the local Redis
    # SENDKIT_WORKER_PROCESSES: delivery beside the API, niced (0: inside the API process)
    worker_processes: int = 0

    def __post_init__(self) -> None:
        self.secret_key = self.secret_key or secrets.token_urlsafe(32)
        self.data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def database(self) -> str:
        return "postgresql" if self.database_url else "sqlite"

    def variables(self) -> dict[str, str]:
        """`SENDKIT_*` as `sendkit serve` runs in production, relaying to smtp-sink."""
        values = {
            "SENDKIT_ENVIRONMENT": "production",
            "SENDKIT_SECRET_KEY": self.secret_key,
            "SENDKIT_DATA_DIR": str(self.data_dir),
            "SENDKIT_DELIVERY": "relay",
            "SENDKIT_RELAY_HOST": procs.LOOPBACK,
            "SENDKIT_RELAY_PORT": str(self.relay_port),
            "SENDKIT_EHLO_NAME": "sendkit.bench.test",
        }
        if self.database_url:
            values["SENDKIT_DATABASE_URL"] = self.database_url
        if self.worker_processes:
            values["SENDKIT_WORKER_PROCESSES"] = str(self.worker_processes)
        if self.processes > 1:
            values["SENDKIT_WEB_PROCESSES"] = str(self.processes)
            values["SENDKIT_REDIS_URL"] = REDIS_URL
        return values

    def env(self, port: int) -> dict[str, str]:
        # Nothing inherited from the caller's SENDKIT_* (a Redis URL, a database...).
        base = {k: v for k, v in os.environ.items() if not k.startswith("SENDKIT_")}
        return {**base, **self.variables(), "SENDKIT_PORT": str(port)}


class Admin:
    """SendKit's public functions against a deployment's database, from this process."""

    def __init__(self, deployment: Deployment) -> None:
        from sendkit import services
        from sendkit.config import Settings

        self.settings = Settings(
            environment="production",
            data_dir=deployment.data_dir,
            database_url=deployment.database_url,
            secret_key=deployment.secret_key,
            redis_url=None,
        )
        self._loop = asyncio.new_event_loop()
        self.services = services.build(self.settings)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        try:
            self.call(self.services.close())
        finally:
            self._loop.close()

    def prepare_demo(self) -> Demo:
        """What `sendkit init --demo --json` and `sendkit account set-plan ID --rate 1000000
        --daily 100000000` do (the same functions, in one process instead of two)."""
        return self.call(self._prepare_demo())

    async def _prepare_demo(self) -> Demo:
        from sendkit import accounts
        from sendkit.cli import ensure_demo
        from sendkit.migrate import migrate

        await migrate(self.services.db)
        demo = await ensure_demo(self.services)
        await accounts.set_plan(
            self.services.db, demo["accountId"], rate=RATE_PER_SECOND, daily=DAILY_LIMIT
        )
        return Demo(demo["accountId"], demo["appId"], demo["apiKey"])

    def counts(self) -> dict[str, int]:
        from sendkit.delivery.queue import counts_by_status

        return self.call(counts_by_status(self.services.db))

    def progress(self, account_id: str) -> tuple[int, bool]:
        """(accepted, whether any is left to deliver), cheaply enough to ask ten times a
        second while the server is measured: the account's daily counters (a row a day)
        and one row of the queue's index. `counts()` reads the whole table: on
        PostgreSQL, with the dead rows of every status update, 10-25 ms of the server's
        CPU each time (counting the pending rows by the index, still 10 ms)."""
        return self.call(self._progress(account_id))

    async def _progress(self, account_id: str) -> tuple[int, bool]:
        import sqlalchemy as sa

        from sendkit.db import DUE, daily_usage
        from sendkit.db import messages as table

        # Every day's counter of the (fresh) account: a run may cross midnight UTC.
        accepted_query = sa.select(sa.func.coalesce(sa.func.sum(daily_usage.c.sent), 0)).where(
            daily_usage.c.account_id == account_id
        )
        pending_query = sa.select(table.c.id).where(DUE).limit(1)
        async with self.services.db.read() as conn:
            accepted = int(await conn.scalar(accepted_query) or 0)
            pending = (await conn.scalar(pending_query)) is not None
        return accepted, pending

    def enqueue(self, account_id: str, total: int, body: str, deadline: float | None = None) -> int:
        """Up to `total` messages through `sendkit.messages.submit`, `_CHUNK` at a time, until
        `deadline` (time.monotonic()) if one is given; returns how many were queued."""
        return self.call(self._enqueue(account_id, total, body, deadline))

    async def _enqueue(self, account_id: str, total: int, body: str, deadline: float | None) -> int:
        from sendkit import accounts, messages

        db = self.services.db
        account = await accounts.load(db, account_id)
        request = messages.SendRequest.model_validate(
            {"from": SENDER, "to": RECIPIENT, "subject": "bench", "body": body}
        )
        queued = 0
        while queued < total and (deadline is None or time.monotonic() < deadline):
            size = min(_CHUNK, total - queued)
            await asyncio.gather(
                *(messages.submit(db, account, request, str(uuid.uuid4())) for _ in range(size))
            )
            queued += size
        return queued

    def import_contacts(self, demo: Demo, rows: int) -> tuple[Any, float]:
        """Write a CSV of `rows` contacts where the dashboard keeps uploads, then run the
        background import job on it. (job, seconds the job took)"""
        from sendkit import imports

        path = imports.upload_path(self.settings.data_dir)
        write_contacts_csv(path, rows)
        return self.call(self._import(demo, path))

    async def _import(self, demo: Demo, path: Path) -> tuple[Any, float]:
        from sendkit import imports

        started = time.perf_counter()
        job = await imports.create_job(
            self.services.db, demo.account_id, demo.app_id, "bench.csv", path
        )
        done = await imports.run_job(self.services.db, job.id)
        return done, time.perf_counter() - started


def write_contacts_csv(path: Path, rows: int) -> None:
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write("emailAddress,firstName,lastName,company,vipLevel\r\n")
        for i in range(rows):
            out.write(f"user{i}@example.org,First{i},Last{i},Company {i % 1000},{i % 5}\r\n")


@dataclass
class Server:
    deployment: Deployment
    port: int
    proc: procs.Proc
    admin: Admin
    demo: Demo

    @property
    def base_url(self) -> str:
        return f"http://{procs.LOOPBACK}:{self.port}"

    def wait_settled(self) -> Server:
        """Answering, and its delivery and signing processes done starting."""
        procs.wait_port(self.port, self.proc)
        procs.wait_settled(self.proc.pid)
        return self


def serve_command() -> list[str]:
    script = Path(sys.executable).with_name("sendkit")
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "sendkit", "serve"]


def launch_serve(deployment: Deployment, log_dir: Path) -> tuple[int, procs.Proc]:
    """Start `sendkit serve` on a free port of 127.0.0.1 (without waiting for it)."""
    port = procs.free_port()
    proc = procs.spawn(
        f"sendkit serve ({deployment.name})",
        serve_command(),
        env=deployment.env(port),
        log_path=log_dir / f"sendkit-{deployment.name}.log",
    )
    return port, proc


@contextmanager
def launched_server(deployment: Deployment, log_dir: Path) -> Iterator[Server]:
    """Prepare the demo account and start `sendkit serve` (call `wait_settled()` before
    using it, so that several servers can start at once); stop both at the end."""
    admin = Admin(deployment)
    try:
        demo = admin.prepare_demo()
        port, proc = launch_serve(deployment, log_dir)
        try:
            yield Server(deployment, port, proc, admin, demo)
        finally:
            proc.stop()
    finally:
        admin.close()


# --- PostgreSQL -----------------------------------------------------------------------------


async def _pg_execute(sql: str) -> str | None:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database="postgres")
    try:
        value = await conn.fetchval(sql)
        return None if value is None else str(value)
    finally:
        await conn.close()


def postgres_version() -> str | None:
    try:
        return asyncio.run(_pg_execute("SHOW server_version"))
    except (OSError, Exception):
        return None


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh `sendkit_bench_<random>` database; its SQLAlchemy URL; dropped at the end."""
    name = f"sendkit_bench_{secrets.token_hex(6)}"
    asyncio.run(_pg_execute(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        asyncio.run(_pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
