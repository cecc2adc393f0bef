"""Workers killed with SIGKILL lose nothing; two workers on one PostgreSQL never share a
message. Real `sendkit worker` processes, a real SMTP server, a real database."""

from __future__ import annotations

import asyncio
import collections
import email
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from sendkit import accounts, messages
from sendkit import services as services_mod
from sendkit.db import attempts
from sendkit.db import messages as messages_table
from sendkit.messages import SendRequest
from sendkit.services import Services
from sendkit.testing.smtp import SmtpSink
from tests.conftest import make_settings, make_tenant
from tests.live import server_env

CONCURRENCY = 20


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "sendkit", "worker", "--concurrency", str(CONCURRENCY)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def worker_env(database_url: str, sink: SmtpSink, tmp_path: Path) -> dict[str, str]:
    return server_env(
        database_url,
        SENDKIT_DATA_DIR=str(tmp_path / "worker"),
        SENDKIT_DELIVERY="relay",
        SENDKIT_RELAY_PORT=str(sink.port),
        SENDKIT_LEASE_SECONDS="2",
        SENDKIT_POLL_INTERVAL="0.05",
        SENDKIT_RETRY_SCHEDULE="0.2;give_up=600;jitter=0",
        SENDKIT_SMTP_TIMEOUT="5",
        SENDKIT_EHLO_NAME="worker.sendkit.test",
    )


async def enqueue(services: Services, count: int) -> set[str]:
    tenant = await make_tenant(services)
    account = await accounts.set_plan(services.db, tenant.account_id, daily=1_000_000)
    ids: set[str] = set()
    for start in range(0, count, 50):
        batch = [
            SendRequest.model_validate(
                {
                    "from": "app@example.com",
                    "to": f"user{i}@example.net",
                    "subject": f"message {i}",
                    "body": f"body {i}",
                }
            )
            for i in range(start, min(start + 50, count))
        ]
        accepted = await asyncio.gather(
            *(messages.submit(services.db, account, r, f"req-{r.subject}") for r in batch)
        )
        ids.update(a.message_id for a in accepted)
    return ids


def received_ids(sink: SmtpSink) -> collections.Counter[str]:
    counter: collections.Counter[str] = collections.Counter()
    for message in sink.messages:
        parsed = email.message_from_bytes(message.data)
        counter[str(parsed["Message-ID"]).strip("<>").split("@")[0]] += 1
    return counter


async def statuses(services: Services) -> collections.Counter[str]:
    async with services.db.read() as conn:
        rows = await conn.execute(
            sa.select(messages_table.c.status, sa.func.count()).group_by(messages_table.c.status)
        )
        return collections.Counter({status: int(n) for status, n in rows})


async def wait_all_delivered(services: Services, total: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await statuses(services))["delivered"] == total:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"not all delivered: {await statuses(services)}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
async def test_sigkill_at_random_points_loses_nothing(tmp_path: Path, database_url: str) -> None:
    services = services_mod.build(
        make_settings(tmp_path, database_url, secret_key="live-test-secret")
    )
    kills = 4
    try:
        async with SmtpSink() as sink:
            ids = await enqueue(services, 500)
            env = worker_env(database_url, sink, tmp_path)
            log = tmp_path / "worker.log"
            rng = random.Random(int(os.environ.get("SENDKIT_CRASH_SEED", "7")))
            for _ in range(kills):
                proc = start_worker(env, log)
                await asyncio.sleep(rng.uniform(1.0, 2.5))  # includes interpreter start-up
                proc.kill()
                proc.wait()
            final = start_worker(env, log)
            try:
                await wait_all_delivered(services, len(ids), timeout=90)
            finally:
                stop(final)
            got = received_ids(sink)
        assert set(got) == ids  # nothing lost, nothing invented
        duplicated = sum(n - 1 for n in got.values())
        # A duplicate needs a kill between the server's 250 and our commit: at most the
        # messages past the start of their SMTP transaction without a committed outcome
        # at each kill, which the worker bounds at twice its concurrency (a slot is free
        # once the transaction is over; its outcome commits in the next batch).
        assert duplicated <= kills * 2 * CONCURRENCY
        assert (await statuses(services)) == {"delivered": len(ids)}
    finally:
        await services.close()


@pytest.mark.slow
async def test_two_workers_share_postgres_without_double_claims(
    tmp_path: Path, pg_database: str
) -> None:
    from tests.conftest import truncate_all

    await truncate_all(pg_database)
    services = services_mod.build(
        make_settings(tmp_path, pg_database, secret_key="live-test-secret")
    )
    try:
        async with SmtpSink() as sink:
            ids = await enqueue(services, 5000)
            env = worker_env(pg_database, sink, tmp_path)
            env["SENDKIT_LEASE_SECONDS"] = "600"  # no reclaim: any double claim is a bug
            workers = [start_worker(env, tmp_path / f"w{i}.log") for i in range(2)]
            try:
                await wait_all_delivered(services, len(ids), timeout=240)
            finally:
                for proc in workers:
                    stop(proc)
            got = received_ids(sink)
        assert set(got) == ids
        assert max(got.values()) == 1
        async with services.db.read() as conn:
            per_message = await conn.execute(
                sa.select(attempts.c.message_id, sa.func.count())
                .group_by(attempts.c.message_id)
                .having(sa.func.count() > 1)
            )
            assert per_message.all() == []
    finally:
        await services.close()
