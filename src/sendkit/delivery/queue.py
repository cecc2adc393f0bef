"""The messages table is the queue: claim under a lease, finish fenced by the lease token.

A claimed message is `sending` with `next_attempt_at` set to its lease expiry, so a lease
that runs out (a crashed worker) makes the message due again under the same index as new
and deferred ones. Every update after the claim names the lease token: a worker whose
lease was taken over cannot record anything.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from sendkit import events, suppressions
from sendkit.db import Database, attempts, messages, now_ms

DUE_STATUSES = ("queued", "deferred", "sending")


@dataclass(frozen=True)
class Claimed:
    id: str
    account_id: str
    app_pk: str | None
    from_header: str
    from_addr: str
    to_header: str
    to_addr: str
    subject: str
    body: str
    created_at: int
    attempts: int
    lease_token: str


@dataclass(frozen=True)
class Outcome:
    """What a worker records for one claimed message."""

    message_id: str
    lease_token: str
    status: str  # delivered | deferred | bounced | failed | suppressed
    next_attempt_at: int | None
    code: int | None
    text: str
    host: str | None
    started_at: int
    duration_ms: int
    attempted: bool = True  # False when no SMTP attempt was made (e.g. suppressed)


_CLAIM_COLUMNS = [
    messages.c.id,
    messages.c.account_id,
    messages.c.app_pk,
    messages.c.from_header,
    messages.c.from_addr,
    messages.c.to_header,
    messages.c.to_addr,
    messages.c.subject,
    messages.c.body,
    messages.c.created_at,
    messages.c.attempts,
    messages.c.lease_token,
]


async def claim(db: Database, limit: int, lease_ms: int) -> list[Claimed]:
    """Take up to `limit` due messages; concurrent claimers never get the same one."""
    now = now_ms()
    token = secrets.token_hex(16)
    due = (
        sa.select(messages.c.id)
        .where(messages.c.status.in_(DUE_STATUSES), messages.c.next_attempt_at <= now)
        .order_by(messages.c.next_attempt_at)
        .limit(limit)
    )
    if not db.is_sqlite:
        due = due.with_for_update(skip_locked=True)
    query = (
        messages.update()
        .where(messages.c.id.in_(due.scalar_subquery()))
        .values(
            status="sending",
            lease_token=token,
            lease_expires_at=now + lease_ms,
            next_attempt_at=now + lease_ms,
            updated_at=now,
        )
        .returning(*_CLAIM_COLUMNS)
    )

    async def take(conn: AsyncConnection) -> list[Claimed]:
        return [Claimed(**row._mapping) for row in await conn.execute(query)]

    # SQLite serialises claimers through its single writer; PostgreSQL skips locked rows.
    return await db.write(take)


async def finish(db: Database, outcomes: Sequence[Outcome]) -> list[str]:
    """Record outcomes in one transaction; returns the ids whose lease was still ours."""

    async def record_all(conn: AsyncConnection) -> list[str]:
        return [o.message_id for o in outcomes if await _record(conn, o)]

    return await db.write(record_all)


async def _record(conn: AsyncConnection, outcome: Outcome) -> bool:
    update = (
        messages.update()
        .where(messages.c.id == outcome.message_id, messages.c.lease_token == outcome.lease_token)
        .values(
            status=outcome.status,
            next_attempt_at=outcome.next_attempt_at,
            lease_token=None,
            lease_expires_at=None,
            last_code=outcome.code,
            last_text=outcome.text[:2000],
            updated_at=now_ms(),
            attempts=messages.c.attempts + (1 if outcome.attempted else 0),
        )
        .returning(messages.c.account_id, messages.c.to_addr)
    )
    row = (await conn.execute(update)).first()
    if row is None:
        return False  # fenced: another worker owns this message now
    if outcome.attempted:
        await conn.execute(
            attempts.insert().values(
                message_id=outcome.message_id,
                started_at=outcome.started_at,
                duration_ms=outcome.duration_ms,
                host=outcome.host,
                outcome=outcome.status,
                code=outcome.code,
                text=outcome.text[:2000],
            )
        )
    if outcome.status == "bounced":
        await suppressions.add(conn, row.account_id, row.to_addr, "hard_bounce")
    # The event (and its webhooks) commit with the outcome, or not at all.
    await events.record(
        conn,
        row.account_id,
        outcome.message_id,
        outcome.status,
        {
            "email": row.to_addr,
            "code": outcome.code,
            "text": outcome.text[:500],
            "host": outcome.host,
            "nextAttemptAt": outcome.next_attempt_at,
        },
    )
    return True


async def release(db: Database, claimed: Sequence[Claimed]) -> None:
    """Give back claims that were never started (graceful shutdown): due again now."""
    if not claimed:
        return
    now = now_ms()

    async def give_back(conn: AsyncConnection) -> None:
        for item in claimed:
            await conn.execute(
                messages.update()
                .where(messages.c.id == item.id, messages.c.lease_token == item.lease_token)
                .values(
                    status="queued" if item.attempts == 0 else "deferred",
                    lease_token=None,
                    lease_expires_at=None,
                    next_attempt_at=now,
                    updated_at=now,
                )
            )

    await db.write(give_back)


async def counts_by_status(db: Database) -> dict[str, int]:
    async with db.read() as conn:
        rows = await conn.execute(
            sa.select(messages.c.status, sa.func.count()).group_by(messages.c.status)
        )
        return {status: int(n) for status, n in rows}
