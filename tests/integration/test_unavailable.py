"""A locked or full database answers 503 at enqueue time, never a false success."""

from __future__ import annotations

import asyncio
import functools
import gc
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
import sqlalchemy as sa

from sendkit import services as services_mod
from sendkit.db import messages
from sendkit.pgconn import CancellableConnection
from sendkit.web.app import create_app
from tests.conftest import PG_HOST, PG_PORT, PG_USER, SEND_EXAMPLE, make_settings, make_tenant


async def _count(services: services_mod.Services) -> int:
    async with services.db.read() as conn:
        return int(await conn.scalar(sa.select(sa.func.count()).select_from(messages)) or 0)


async def _post(services: services_mod.Services, token: str) -> httpx.Response:
    app = create_app(services.settings, services)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        return await client.post(
            "/v1/send", json=SEND_EXAMPLE, headers={"Authorization": f"Bearer {token}"}
        )


async def test_locked_database_answers_503(tmp_path: Path, database_url: str, backend: str) -> None:
    services = services_mod.build(make_settings(tmp_path, database_url, db_lock_timeout=0.3))
    try:
        tenant = await make_tenant(services)
        async with _held_lock(database_url, backend):
            response = await _post(services, tenant.token)
        assert response.status_code == 503
        assert response.json()["code"] == 100503
        assert await _count(services) == 0
        retried = await _post(services, tenant.token)  # the lock is gone: accepted now
        assert retried.status_code == 200
        assert await _count(services) == 1
    finally:
        await services.close()


class _held_lock:
    def __init__(self, url: str, backend: str) -> None:
        self.url, self.backend = url, backend

    async def __aenter__(self) -> None:
        if self.backend == "sqlite":
            self.sqlite = sqlite3.connect(self.url.split("///", 1)[1], isolation_level=None)
            self.sqlite.execute("BEGIN EXCLUSIVE")
        else:
            self.pg = await asyncpg.connect(
                host=PG_HOST, port=PG_PORT, user=PG_USER, database=self.url.rsplit("/", 1)[1]
            )
            self.tx = self.pg.transaction()
            await self.tx.start()
            await self.pg.execute("LOCK TABLE daily_usage IN ACCESS EXCLUSIVE MODE")

    async def __aexit__(self, *exc: object) -> None:
        if self.backend == "sqlite":
            self.sqlite.execute("ROLLBACK")
            self.sqlite.close()
        else:
            await self.tx.rollback()
            await self.pg.close()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_full_disk_answers_503(
    tmp_path: Path, tiny_disk: Path, sqlite_template: Path
) -> None:
    db_path = tiny_disk / "sendkit.db"
    shutil.copyfile(sqlite_template, db_path)
    services = services_mod.build(make_settings(tmp_path, f"sqlite+aiosqlite:///{db_path}"))
    filler = tiny_disk / "filler"
    try:
        tenant = await make_tenant(services)
        assert (await _post(services, tenant.token)).status_code == 200
        try:  # take every byte that is left
            with filler.open("wb", buffering=0) as out:
                while True:
                    out.write(b"\0" * 4096)
        except OSError:
            pass
        big = SEND_EXAMPLE | {"body": "x" * 200_000}
        app = create_app(services.settings, services)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as client:
            response = await client.post("/v1/send", json=big, headers=tenant.auth)
        assert response.status_code == 503
        assert response.json()["code"] == 100503
        filler.unlink()
        assert (await _post(services, tenant.token)).status_code == 200
        assert await _count(services) == 2
    finally:
        await services.close()


async def test_a_write_cancelled_mid_statement_does_not_keep_the_database_locked(
    services: services_mod.Services, backend: str
) -> None:
    """A task cancelled while the driver runs its statement (an import stopped by a
    shutdown, say) must end, roll back, and leave no lock behind it. SQLite kept its
    write lock: the next write waited out its whole busy timeout (5 s) and got a 503.
    asyncpg never ended the task: cancelled while it was still sending an executemany's
    rows, it swallowed the cancellation and waited for a reply the server, still reading,
    never sent, with the updated rows locked."""
    db = services.db
    async with db.begin() as conn:
        await conn.exec_driver_sql("CREATE TABLE scratch (k INTEGER PRIMARY KEY, v TEXT)")
        await conn.execute(
            sa.text("INSERT INTO scratch (k, v) VALUES (:k, 'a')"),
            [{"k": k} for k in range(20_000)],
        )
    inside = asyncio.Event()

    async def long_update() -> None:
        async with db.begin() as conn:
            inside.set()
            await conn.execute(
                sa.text("UPDATE scratch SET v = :v WHERE k = :k"),
                [{"k": k, "v": "b"} for k in range(20_000)],
            )

    reported: list[str] = []
    asyncio.get_running_loop().set_exception_handler(
        lambda _loop, context: reported.append(str(context.get("message")))
    )
    for _ in range(3):
        task = asyncio.create_task(long_update())
        await inside.wait()
        inside.clear()
        await asyncio.sleep(0.01)  # the statement is running on the driver's side
        assert not task.done()
        task.cancel()
        finished, _ = await asyncio.wait([task], timeout=5)
        assert finished, "the cancelled statement never ended"
        assert task.cancelled()
        started = time.monotonic()
        async with db.begin() as conn:
            await conn.exec_driver_sql("UPDATE scratch SET v = 'c' WHERE k = 1")
        assert time.monotonic() - started < 1.0
        async with db.begin() as conn:
            changed = await conn.scalar(sa.text("SELECT count(*) FROM scratch WHERE v = 'b'"))
        assert changed == 0
    # Nothing of the statements was left behind: no task destroyed while still pending,
    # no error nobody retrieved (both reach the loop's exception handler).
    gc.collect()
    await asyncio.sleep(0.05)
    assert reported == []


async def test_a_cancelled_executemany_held_up_by_a_lock_leaves_nothing_behind(
    pg_database: str,
) -> None:
    """The statement's rows wait on a row another transaction holds, so asyncpg has
    stopped sending them (the socket is full) when the caller is cancelled: the caller
    ends at once, and the statement's own task with it (closing the connection does not
    wake a task waiting to send)."""
    database = pg_database.rsplit("/", 1)[1]
    connect = functools.partial(
        asyncpg.connect, host=PG_HOST, port=PG_PORT, user=PG_USER, database=database
    )
    holder = await connect()
    await holder.execute("CREATE TABLE IF NOT EXISTS held (k int PRIMARY KEY, v text)")
    await holder.execute("INSERT INTO held VALUES (1, 'a') ON CONFLICT DO NOTHING")
    reported: list[str] = []
    asyncio.get_running_loop().set_exception_handler(
        lambda _loop, context: reported.append(str(context.get("message")))
    )
    held = holder.transaction()
    await held.start()
    await holder.execute("UPDATE held SET v = 'held' WHERE k = 1")
    blocked = await connect(connection_class=CancellableConnection)
    try:
        update = asyncio.ensure_future(
            blocked.executemany("UPDATE held SET v = $2 WHERE k = $1", [(1, "x" * 100_000)] * 300)
        )
        await asyncio.sleep(0.5)
        assert not update.done()
        update.cancel()
        finished, _ = await asyncio.wait([update], timeout=5)
        assert finished and update.cancelled()
        await asyncio.sleep(0.1)
        assert asyncio.all_tasks() == {asyncio.current_task()}
        assert blocked.is_closed()
    finally:
        await held.rollback()
        await holder.execute("DROP TABLE held")
        await holder.close()
    gc.collect()
    await asyncio.sleep(0.05)
    assert reported == []
