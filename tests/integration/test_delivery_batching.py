"""The delivery side in batches: outcomes recorded set-wise and fenced per message, slots
freed when the SMTP transaction is over (not when its outcome commits), claims ahead
given back on stop, sandbox copies kept in groups. Real databases, a real SMTP server."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import sqlalchemy as sa

from sendkit import accounts, messages, webhooks
from sendkit.db import attempts, events, suppressions, webhook_deliveries
from sendkit.db import messages as messages_table
from sendkit.delivery import queue
from sendkit.delivery.queue import Claimed, Outcome
from sendkit.delivery.sandbox import SandboxTransport, raw_message
from sendkit.delivery.transports import Envelope
from sendkit.delivery.worker import Worker, make_transport
from sendkit.messages import SendRequest
from sendkit.services import Services
from sendkit.testing.smtp import Fault, SmtpSink, Stage
from tests.conftest import PG_HOST, PG_PORT, PG_USER, make_tenant
from tests.integration.eventkit import build_services


async def enqueue(services: Services, account_id: str, count: int) -> list[str]:
    account = await accounts.set_plan(services.db, account_id, rate=1000, daily=1_000_000)
    accepted = await asyncio.gather(
        *(
            messages.submit(
                services.db,
                account,
                SendRequest.model_validate(
                    {
                        "from": "app@example.com",
                        "to": f"User{i}@Example.net",
                        "subject": f"message {i}",
                        "body": f"body {i}",
                    }
                ),
                f"req-{i}",
            )
            for i in range(count)
        )
    )
    return [a.message_id for a in accepted]


async def status_of(services: Services, message_id: str) -> str:
    found = await messages.find(services.db, message_id)
    assert found is not None
    return str(found["status"])


def outcome(claimed: Claimed, status: str, **changes: Any) -> Outcome:
    values: dict[str, Any] = {
        "message_id": claimed.id,
        "lease_token": claimed.lease_token,
        "status": status,
        "next_attempt_at": None,
        "code": 250 if status == "delivered" else 550 if status == "bounced" else 451,
        "text": f"{status} reply",
        "host": "mx.example.net:25",
        "started_at": 1_000,
        "duration_ms": 7,
    }
    return Outcome(**(values | changes))


async def rows(services: Services, query: Any) -> list[Any]:
    async with services.db.read() as conn:
        return list((await conn.execute(query)).all())


async def test_a_batch_records_only_the_outcomes_whose_lease_is_still_held(
    tmp_path: Path, database_url: str
) -> None:
    services = build_services(tmp_path, database_url, workers=False)
    try:
        tenant = await make_tenant(services)
        await webhooks.create_endpoint(
            services.db,
            services.box,
            services.settings,
            tenant.account_id,
            webhooks.CreateWebhook(url="http://127.0.0.1:9/hook", events="*"),
        )
        await enqueue(services, tenant.account_id, 8)
        first = await queue.claim(services.db, 100, lease_ms=1)
        assert len(first) == 8
        await asyncio.sleep(0.01)
        # Another worker takes three of them over once the first lease ran out.
        taken = await queue.claim(services.db, 3, lease_ms=60_000)
        taken_ids = {c.id for c in taken}
        assert len(taken_ids) == 3
        statuses = ["delivered", "bounced", "deferred", "failed", "suppressed"] * 2
        batch = [
            outcome(
                claimed,
                status,
                next_attempt_at=9_999_999_999_999 if status == "deferred" else None,
                attempted=status != "suppressed",
            )
            for claimed, status in zip(first, statuses, strict=False)
        ]
        recorded = await queue.finish(services.db, batch)

        mine = [o for o in batch if o.message_id not in taken_ids]
        assert recorded == [o.message_id for o in mine]
        by_id = {
            r.id: r
            for r in await rows(
                services,
                sa.select(messages_table).where(messages_table.c.id.in_([c.id for c in first])),
            )
        }
        for claimed in taken:  # untouched: still leased to the other worker
            row = by_id[claimed.id]
            assert (row.status, row.lease_token, row.attempts) == (
                "sending",
                claimed.lease_token,
                0,
            )
        for o in mine:
            row = by_id[o.message_id]
            assert row.status == o.status
            assert row.lease_token is None and row.lease_expires_at is None
            assert row.attempts == (1 if o.attempted else 0)
            assert (row.last_code, row.last_text) == (o.code, o.text)
            assert row.next_attempt_at == o.next_attempt_at

        logged = await rows(services, sa.select(attempts.c.message_id, attempts.c.outcome))
        assert sorted(logged) == sorted((o.message_id, o.status) for o in mine if o.attempted)

        outcome_events = await rows(
            services,
            sa.select(events.c.id, events.c.message_id, events.c.type, events.c.data).where(
                events.c.type != "queued"
            ),
        )
        assert sorted((e.message_id, e.type) for e in outcome_events) == sorted(
            (o.message_id, o.status) for o in mine
        )
        for event in outcome_events:
            data = orjson.loads(event.data)
            assert data["email"] == by_id[event.message_id].to_addr
            assert data["text"] == f"{event.type} reply"
        # Each recorded event has its webhook delivery, carrying that event's id.
        hooks = await rows(
            services, sa.select(webhook_deliveries.c.event_id, webhook_deliveries.c.payload)
        )
        outcome_hooks = {
            h.event_id: orjson.loads(h.payload)
            for h in hooks
            if orjson.loads(h.payload)["type"] != "queued"
        }
        assert set(outcome_hooks) == {e.id for e in outcome_events}
        for event in outcome_events:
            payload = outcome_hooks[event.id]
            assert payload["type"] == event.type
            assert payload["data"]["eventId"] == event.id
            assert payload["data"]["messageId"] == event.message_id

        listed = await rows(services, sa.select(suppressions.c.email_lower, suppressions.c.reason))
        bounced = [by_id[o.message_id].to_addr for o in mine if o.status == "bounced"]
        assert sorted(listed) == sorted((addr.lower(), "hard_bounce") for addr in bounced)

        # The late worker's outcomes for the rest are fenced out too.
        assert await queue.finish(services.db, batch) == []
    finally:
        await services.close()


async def test_many_outcomes_record_in_one_call(tmp_path: Path, database_url: str) -> None:
    services = build_services(tmp_path, database_url, workers=False)
    try:
        tenant = await make_tenant(services)
        ids = await enqueue(services, tenant.account_id, 700)  # more than one fenced chunk
        claimed = await queue.claim(services.db, 1000, lease_ms=60_000)
        assert sorted(c.id for c in claimed) == sorted(ids)
        text = "250 2.0.0 ok \x00 " + "x" * 3000  # a NUL and an over-long reply
        recorded = await queue.finish(
            services.db, [outcome(c, "delivered", text=text) for c in claimed]
        )
        assert sorted(recorded) == sorted(ids)
        assert await queue.counts_by_status(services.db) == {"delivered": 700}
        texts = await rows(services, sa.select(messages_table.c.last_text).distinct())
        assert len(texts) == 1 and len(texts[0][0]) <= 2000 and "\x00" not in texts[0][0]
        count = await rows(services, sa.select(sa.func.count()).select_from(attempts))
        assert count[0][0] == 700
    finally:
        await services.close()


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield
    finally:
        stop.set()
        await task
        await worker.transport.close()


@asynccontextmanager
async def outcomes_blocked(database_url: str) -> AsyncIterator[None]:
    """Another connection keeps the worker's outcomes from committing: on SQLite it holds
    the write lock; on PostgreSQL a lock on `attempts`, which recording needs and claims
    do not."""
    if database_url.startswith("sqlite"):
        path = database_url.split("///", 1)[1]
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # In a thread: the event loop must keep running the worker while this waits.
        await asyncio.to_thread(conn.execute, "BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    pg = await asyncpg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, database=database_url.rsplit("/", 1)[1]
    )
    try:
        async with pg.transaction():
            await pg.execute("LOCK TABLE attempts IN SHARE MODE")
            yield
    finally:
        await pg.close()


async def wait_until(check: Callable[[], Any], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_a_slot_takes_the_next_message_while_an_outcome_waits_for_its_commit(
    tmp_path: Path, database_url: str, smtp_sink: SmtpSink
) -> None:
    services = build_services(
        tmp_path, database_url, delivery="relay", relay_port=smtp_sink.port, workers=False
    )
    try:
        tenant = await make_tenant(services)
        first, second = await enqueue(services, tenant.account_id, 2)
        smtp_sink.fault = Fault.slow(Stage.DOT, 0.5)
        worker = Worker(services, make_transport(services.settings, services.db), concurrency=1)
        async with running(worker):

            async def both_claimed() -> bool:
                return {await status_of(services, first), await status_of(services, second)} == {
                    "sending"
                }

            await wait_until(both_claimed)
            async with outcomes_blocked(database_url):
                smtp_sink.fault = None

                async def both_sent() -> bool:
                    return len(smtp_sink.messages) == 2

                # One slot: the second message went out while the first one's outcome
                # could not commit.
                await wait_until(both_sent, timeout=4)
                assert await status_of(services, first) == "sending"
                assert await status_of(services, second) == "sending"

            async def both_delivered() -> bool:
                return {await status_of(services, first), await status_of(services, second)} == {
                    "delivered"
                }

            await wait_until(both_delivered)
    finally:
        await services.close()


async def test_stopping_gives_back_what_was_claimed_ahead(
    tmp_path: Path, database_url: str, smtp_sink: SmtpSink
) -> None:
    services = build_services(
        tmp_path, database_url, delivery="relay", relay_port=smtp_sink.port, workers=False
    )
    try:
        tenant = await make_tenant(services)
        ids = await enqueue(services, tenant.account_id, 3)
        smtp_sink.fault = Fault.slow(Stage.DOT, 0.5)
        worker = Worker(services, make_transport(services.settings, services.db), concurrency=1)
        async with running(worker):

            async def sending() -> bool:
                return smtp_sink.active_connections > 0

            await wait_until(sending)
        # The one in its SMTP transaction finished and was recorded; the one claimed
        # ahead went back to the queue, due now; nothing is left leased.
        counts = await queue.counts_by_status(services.db)
        assert counts == {"delivered": 1, "queued": 2}
        assert len(smtp_sink.messages) == 1
        leased = await rows(
            services,
            sa.select(messages_table.c.id).where(messages_table.c.lease_token.is_not(None)),
        )
        assert leased == []
        again = await queue.claim(services.db, 10, 60_000)  # due again at once
        assert len(again) == 2 and {c.id for c in again} < set(ids)
    finally:
        await services.close()


async def test_sandbox_copies_are_kept_in_groups(tmp_path: Path, database_url: str) -> None:
    services = build_services(tmp_path, database_url, workers=False)
    try:
        tenant = await make_tenant(services)
        ids = await enqueue(services, tenant.account_id, 30)
        sandbox = SandboxTransport(services.db)

        def envelope(message_id: str, body: bytes) -> Envelope:
            return Envelope(
                f"b+{message_id}@bounces.example.com", "u@example.net", body, message_id
            )

        results = await asyncio.gather(
            *(sandbox.send(envelope(m, b"Subject: one\r\n\r\nfirst\r\n")) for m in ids),
            # The same message twice in one group: one copy, the later one.
            sandbox.send(envelope(ids[0], b"Subject: two\r\n\r\nsecond\r\n")),
        )
        assert all(r.delivered for r in results)
        for message_id in ids[1:]:
            raw = await raw_message(services.db, message_id)
            assert raw is not None
            assert raw.startswith(f"Return-Path: <b+{message_id}@bounces.example.com>\r\n".encode())
        # A retried message replaces its earlier copy.
        await sandbox.send(envelope(ids[0], b"Subject: three\r\n\r\nthird\r\n"))
        raw = await raw_message(services.db, ids[0])
        assert raw is not None and raw.endswith(b"third\r\n")
        inbox_rows = await rows(services, sa.text("SELECT account_id FROM inbox"))
        assert [r[0] for r in inbox_rows] == [tenant.account_id] * 30
        # A message that no longer exists keeps nothing and fails nobody.
        gone = await sandbox.send(envelope("0" * 32, b"Subject: x\r\n\r\nx\r\n"))
        assert gone.delivered
        assert await raw_message(services.db, "0" * 32) is None
    finally:
        await services.close()


async def test_a_stale_and_a_current_outcome_of_one_message_record_only_the_current(
    tmp_path: Path, database_url: str
) -> None:
    services = build_services(tmp_path, database_url, workers=False)
    try:
        tenant = await make_tenant(services)
        (message_id,) = await enqueue(services, tenant.account_id, 1)
        (stale,) = await queue.claim(services.db, 1, lease_ms=1)
        await asyncio.sleep(0.01)
        (current,) = await queue.claim(services.db, 1, lease_ms=60_000)
        assert stale.id == current.id == message_id
        # The first worker's commit stalled past its lease: both land in one batch.
        await queue.finish(services.db, [outcome(stale, "bounced"), outcome(current, "delivered")])

        assert await status_of(services, message_id) == "delivered"
        tried = await rows(services, sa.select(attempts.c.outcome))
        assert [r.outcome for r in tried] == ["delivered"]
        kinds = await rows(services, sa.select(events.c.type).order_by(events.c.id))
        assert [r.type for r in kinds] == ["queued", "delivered"]
        assert await rows(services, sa.select(suppressions.c.email_lower)) == []
    finally:
        await services.close()


async def test_reply_text_that_is_not_valid_unicode_is_recorded(
    tmp_path: Path, database_url: str
) -> None:
    services = build_services(tmp_path, database_url, workers=False)
    try:
        tenant = await make_tenant(services)
        ids = await enqueue(services, tenant.account_id, 3)
        claimed = await queue.claim(services.db, 3, lease_ms=60_000)
        # aiosmtplib keeps a reply's undecodable bytes as lone surrogates (here a Latin-1
        # é from a remote server); no JSON encoder takes them.
        garbled = "550 5.1.1 utilisateur inconnu: caf\udce9\x00"
        batch = [outcome(c, "bounced", text=garbled) for c in claimed]
        assert sorted(await queue.finish(services.db, batch)) == sorted(ids)
        found = await messages.find(services.db, ids[0])
        assert found is not None
        assert found["last_text"] == "550 5.1.1 utilisateur inconnu: caf?"
    finally:
        await services.close()


async def test_an_outcome_the_database_refuses_does_not_hold_back_the_others(
    tmp_path: Path, database_url: str
) -> None:
    services = build_services(tmp_path, database_url, workers=False)
    worker = Worker(services, SandboxTransport(services.db), concurrency=4)
    try:
        tenant = await make_tenant(services)
        ids = await enqueue(services, tenant.account_id, 4)
        claimed = await queue.claim(services.db, 4, lease_ms=60_000)
        good = [outcome(c, "delivered") for c in claimed[:3]]
        # No database stores this event's data: the retry loop must not spin on it.
        bad = outcome(claimed[3], "delivered", host="\udcff" * 3, text="")
        await asyncio.wait_for(worker._commit([*good, bad]), 10)

        statuses = {i: await status_of(services, i) for i in ids}
        assert [statuses[c.id] for c in claimed[:3]] == ["delivered"] * 3
        assert statuses[claimed[3].id] == "sending"  # left to its lease
    finally:
        await services.close()


async def test_outcomes_wait_briefly_to_share_a_record_transaction(
    tmp_path: Path, database_url: str, smtp_sink: SmtpSink, monkeypatch: Any
) -> None:
    """While slots are busy, a batch of outcomes waits up to 10 ms for half the slots
    to finish before it is recorded (a record transaction costs about the same whatever
    its size); the last ones, with nothing left in flight, are recorded at once."""
    services = build_services(
        tmp_path, database_url, delivery="relay", relay_port=smtp_sink.port, workers=False
    )
    sizes: list[int] = []
    real_finish = queue.finish

    async def counted(db: Any, batch: Any) -> list[str]:
        sizes.append(len(batch))
        return await real_finish(db, batch)

    monkeypatch.setattr(queue, "finish", counted)
    try:
        tenant = await make_tenant(services)
        await enqueue(services, tenant.account_id, 80)
        worker = Worker(services, make_transport(services.settings, services.db), concurrency=20)
        async with running(worker):

            async def all_delivered() -> bool:
                return await queue.counts_by_status(services.db) == {"delivered": 80}

            await wait_until(all_delivered)
        assert sum(sizes) == 80
        assert len(sizes) <= 12, sizes  # more without the wait (SQLite)
    finally:
        await services.close()


async def test_outcomes_wait_only_while_another_message_is_still_being_sent(
    tmp_path: Path, database_url: str
) -> None:
    services = build_services(tmp_path, database_url, workers=False)
    try:
        worker = Worker(services, make_transport(services.settings, services.db), concurrency=20)
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()
        finished.set_result(None)
        sending: asyncio.Future[None] = loop.create_future()
        worker._outcomes = [object()]  # type: ignore[list-item]
        worker._inflight = {finished}  # type: ignore[arg-type]
        assert not worker._worth_waiting()  # only the one whose outcome this is
        worker._inflight = {finished, sending}  # type: ignore[arg-type]
        assert worker._worth_waiting()
        worker._outcomes = [object()] * 10  # type: ignore[list-item]
        assert not worker._worth_waiting()  # half the slots' worth: record now
        worker._outcomes = [object()]  # type: ignore[list-item]
        worker._closing_at = 1.0
        assert not worker._worth_waiting()  # stopping: never wait
        sending.cancel()
        await worker.transport.close()
    finally:
        await services.close()
