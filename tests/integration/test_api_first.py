"""API processes first, on SQLite: an API process whose groups grow (it is saturated)
says so between processes, and a delivery process then holds back its claims and its
writes, each for a bounded time, so that a burst is answered before what it queued is
delivered. Real databases, a real worker, the flock between them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from sendkit import db as db_module
from sendkit import services as services_mod
from sendkit.db import Database
from sendkit.delivery import worker as worker_module
from sendkit.delivery.sandbox import SandboxTransport
from sendkit.delivery.worker import Worker
from sendkit.filelock import ApiBusy
from tests.conftest import make_settings, make_tenant
from tests.integration.eventkit import FAST
from tests.integration.test_delivery_batching import enqueue, status_of


async def _scratch_db(tmp_path: Path, **options: object) -> Database:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'busy.db'}", **options)  # type: ignore[arg-type]
    async with db.begin() as conn:
        await conn.execute(sa.text("CREATE TABLE IF NOT EXISTS t (x INTEGER)"))
    return db


async def _insert(conn: AsyncConnection) -> None:
    await conn.execute(sa.text("INSERT INTO t VALUES (1)"))


def _probe(tmp_path: Path, name: str = "busy.db") -> ApiBusy:
    """Another process's view of the flag."""
    return ApiBusy(tmp_path / f"{name}.api-busy")


async def test_an_api_process_says_it_is_saturated_while_its_groups_are_large(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db_module, "_API_QUIET", 0.2)
    db = await _scratch_db(tmp_path, commit_in_loop=True, api_first="announce")
    probe = _probe(tmp_path)
    try:
        for _ in range(3):  # one request at a time: groups of one, not saturated
            await db.write(_insert)
        assert not probe.announced()
        await asyncio.gather(*(db.write(_insert) for _ in range(40)))
        assert probe.announced()
        await asyncio.sleep(0.1)
        assert probe.announced()  # not between two bursts' groups
        await asyncio.sleep(0.25)
        assert not probe.announced()  # quiet for _API_QUIET: withdrawn
    finally:
        probe.close()
        await db.dispose()
    probe = _probe(tmp_path)
    try:
        db = await _scratch_db(tmp_path, commit_in_loop=True, api_first="announce")
        await asyncio.gather(*(db.write(_insert) for _ in range(40)))
        assert probe.announced()
        await db.dispose()  # a stopped API process says nothing any more
        assert not probe.announced()
    finally:
        probe.close()


async def test_a_delivery_processes_writes_wait_briefly_for_a_saturated_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db_module, "_API_FIRST_FOR", 0.4)
    db = await _scratch_db(tmp_path, api_first="defer")
    api = _probe(tmp_path)
    try:
        started = time.monotonic()
        await db.write(_insert)
        assert time.monotonic() - started < 0.2  # nobody saturated: no wait
        api.announce()
        write = asyncio.ensure_future(db.write(_insert))
        await asyncio.sleep(0.15)
        assert not write.done()
        api.withdraw()
        started = time.monotonic()
        await asyncio.wait_for(write, 5)
        assert time.monotonic() - started < 0.1
        api.announce()  # and never longer than the bound
        started = time.monotonic()
        await asyncio.wait_for(db.write(_insert), 5)
        assert 0.35 <= time.monotonic() - started < 1.0
        async with db.read() as conn:
            assert await conn.scalar(sa.text("SELECT count(*) FROM t")) == 3
    finally:
        api.close()
        await db.dispose()


async def test_a_delivery_process_claims_nothing_while_an_api_is_saturated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sqlite_template: Path
) -> None:
    """The messages a burst queued wait for it to end (a bounded wait): then they go."""
    monkeypatch.setattr(worker_module, "CLAIM_YIELD", 0.8)
    data = tmp_path / "data"
    data.mkdir()
    (data / "sendkit.db").write_bytes(sqlite_template.read_bytes())
    settings = make_settings(tmp_path, f"sqlite+aiosqlite:///{data / 'sendkit.db'}", **FAST)
    services = services_mod.build(settings, api_first="defer")
    api = _probe(data, "sendkit.db")
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    try:
        tenant = await make_tenant(services)
        ids = await enqueue(services, tenant.account_id, 3)
        api.announce()
        worker = Worker(services, SandboxTransport(services.db), concurrency=4)
        task = asyncio.create_task(worker.run(stop))
        await asyncio.sleep(0.4)
        assert [await status_of(services, i) for i in ids] == ["queued"] * 3
        # Still saturated: the bound runs out and the claim goes ahead all the same.
        deadline = time.monotonic() + 5
        while [await status_of(services, i) for i in ids] != ["delivered"] * 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        more = await enqueue(services, tenant.account_id, 2)
        api.withdraw()  # not saturated: claimed at once
        worker.wakeup.set()
        deadline = time.monotonic() + 0.5
        while [await status_of(services, i) for i in more] != ["delivered"] * 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        api.announce()  # saturated again: stopping does not wait out the bound
        monkeypatch.setattr(worker_module, "CLAIM_YIELD", 30.0)
        worker.wakeup.set()  # to its next claim, which waits for the API
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(task, 5)
    finally:
        stop.set()
        if task is not None:
            await asyncio.wait_for(task, 10)
        api.close()
        await services.close()
