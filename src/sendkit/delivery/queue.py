"""The messages table is the queue: claim under a lease, finish fenced by the lease token.

A claimed message is `sending` with `next_attempt_at` set to its lease expiry, so a lease
that runs out (a crashed worker) makes the message due again under the same index as new
and deferred ones. Every update after the claim names the lease token: a worker whose
lease was taken over cannot record anything.

Outcomes are recorded in batches with a fixed number of statements per batch, whatever
its size: one fenced `UPDATE … FROM <the batch as JSON> … RETURNING` tells which leases
were still ours (on SQLite the transaction holds the write lock, on PostgreSQL the update
locks the rows), then one insert each of attempts, suppressions and events. The hot
statements are built once, here, and executed with parameters.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from sendkit import events
from sendkit.db import DUE, Database, attempts, messages, now_ms
from sendkit.db import suppressions as suppressions_table
from sendkit.prepared import Prepared

# Outcomes per fenced UPDATE: bounds one statement's parameter and the rows it returns.
_FINISH_CHUNK = 500
_TEXT_LIMIT = 2000


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


def _claim_statement(skip_locked: bool, returning: bool = True) -> Any:
    due = (
        sa.select(messages.c.id)
        .where(
            DUE,
            messages.c.next_attempt_at <= sa.bindparam("now", type_=sa.BigInteger),
        )
        .order_by(messages.c.next_attempt_at)
        .limit(sa.bindparam("limit", type_=sa.Integer))
    )
    if skip_locked:
        due = due.with_for_update(skip_locked=True)
    until = sa.bindparam("until", type_=sa.BigInteger)
    claim = (
        messages.update()
        .where(messages.c.id.in_(due.scalar_subquery()))
        .values(
            status="sending",
            lease_token=sa.bindparam("token", type_=sa.String),
            lease_expires_at=until,
            next_attempt_at=until,
            updated_at=sa.bindparam("now", type_=sa.BigInteger),
        )
    )
    return claim.returning(*_CLAIM_COLUMNS) if returning else claim


# PostgreSQL skips locked rows and returns the claimed ones at once.
_CLAIM_RETURNING = _claim_statement(True)
# SQLite serialises claimers through its single writer, which every process waits for:
# the claim marks the rows (one step), and they are read after the commit. Returned
# from the UPDATE, each row was a step of its own, handing the GIL back and forth with
# the writer lock held (5-6 ms a claim in a delivery process whose loop is busy).
_CLAIM_MARK = _claim_statement(False, returning=False)
_CLAIMED = (
    sa.select(*_CLAIM_COLUMNS)
    .where(
        DUE,  # by the due index
        messages.c.status == "sending",
        messages.c.next_attempt_at == sa.bindparam("until", type_=sa.BigInteger),
        messages.c.lease_token == sa.bindparam("token", type_=sa.String),
    )
    .order_by(messages.c.id)
)


async def claim(db: Database, limit: int, lease_ms: int) -> list[Claimed]:
    """Take up to `limit` due messages; concurrent claimers never get the same one."""
    if limit < 1:
        return []
    now = now_ms()
    params = {"now": now, "until": now + lease_ms, "token": secrets.token_hex(16), "limit": limit}

    async def take(conn: AsyncConnection) -> list[Claimed]:
        rows = await conn.execute(_CLAIM_RETURNING, params)
        return [Claimed(*row) for row in rows]

    async def mark(conn: AsyncConnection) -> int:
        return int((await conn.execute(_CLAIM_MARK, params)).rowcount or 0)

    if not db.is_sqlite:
        return await db.write(take)
    if not await db.write(mark):
        return []
    async with db.read() as conn:  # ours until the lease ends: nobody else changes them
        rows = await conn.execute(_CLAIMED, params)
        return [Claimed(*row) for row in rows]


# --- recording outcomes ------------------------------------------------------------------

# The batch travels as one JSON parameter (a list of objects with these keys) and is
# joined to the messages it names; only rows whose lease token still matches change.
_FINISH_SQL = {
    "sqlite": sa.text(
        """
UPDATE messages
SET status = v.status, next_attempt_at = v.next_at, lease_token = NULL,
    lease_expires_at = NULL, last_code = v.code, last_text = v.text, updated_at = :now,
    attempts = messages.attempts + v.attempted
FROM (
    SELECT json_extract(value, '$.id') AS id, json_extract(value, '$.token') AS token,
           json_extract(value, '$.status') AS status, json_extract(value, '$.next_at') AS next_at,
           json_extract(value, '$.code') AS code, json_extract(value, '$.text') AS text,
           json_extract(value, '$.attempted') AS attempted
    FROM json_each(:rows)
) AS v
WHERE messages.id = v.id AND messages.lease_token = v.token
RETURNING messages.id, messages.account_id, messages.to_addr
"""
    ),
    "postgresql": sa.text(
        """
UPDATE messages
SET status = v.status, next_attempt_at = v.next_at, lease_token = NULL,
    lease_expires_at = NULL, last_code = v.code, last_text = v.text, updated_at = :now,
    attempts = messages.attempts + v.attempted
FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS v(
    id text, token text, status text, next_at bigint, code integer, text text,
    attempted integer
)
WHERE messages.id = v.id AND messages.lease_token = v.token
RETURNING messages.id, messages.account_id, messages.to_addr
"""
    ),
}
_FINISH = Prepared(lambda dialect: _FINISH_SQL[dialect])
_ATTEMPT_COLUMNS = ("message_id", "started_at", "duration_ms", "host", "outcome", "code", "text")
# One multi-row statement on SQLite: executemany steps each row alone, handing the GIL
# back and forth with the writer lock held (in a delivery process, whose loop is busy).
_INSERT_ATTEMPTS = Prepared(
    lambda _: attempts.insert().values({c: sa.bindparam(c) for c in _ATTEMPT_COLUMNS}),
    multi_row=True,
)
_ADD_SUPPRESSION = {
    dialect.name: insert(suppressions_table).on_conflict_do_nothing(
        index_elements=["account_id", "email_lower"]
    )
    for dialect, insert in (
        (sqlite.dialect, sqlite.insert),
        (postgresql.dialect, postgresql.insert),
    )
}


async def finish(db: Database, outcomes: Sequence[Outcome]) -> list[str]:
    """Record outcomes in one transaction; returns the ids whose lease was still ours."""
    if not outcomes:
        return []

    async def record_all(conn: AsyncConnection) -> list[str]:
        return await record(conn, outcomes)

    return await db.write(record_all)


async def record(conn: AsyncConnection, outcomes: Sequence[Outcome]) -> list[str]:
    """Record a batch of outcomes in the caller's transaction, each fenced by its lease
    token: the status, the attempt, a bounce's suppression, the event and its webhooks.
    Returns the ids recorded (in the order given); a fenced-out outcome leaves no trace."""
    recorded: list[str] = []
    for round_ in _rounds(outcomes):
        recorded += await _record_round(conn, round_)
    return recorded


def _rounds(outcomes: Sequence[Outcome]) -> list[list[Outcome]]:
    """Rounds in which each message appears once. A stale outcome and the current one of
    the same message can share a batch (a commit stalled past the lease); in separate
    rounds the fence sees the first one's effect, and the rows a round's UPDATE returns
    (SQLite's RETURNING sees only the updated table) name one outcome each."""
    rounds: list[list[Outcome]] = []
    seen: dict[str, int] = {}
    for outcome in outcomes:
        index = seen[outcome.message_id] = seen.get(outcome.message_id, -1) + 1
        if index == len(rounds):
            rounds.append([])
        rounds[index].append(outcome)
    return rounds


async def _record_round(conn: AsyncConnection, outcomes: Sequence[Outcome]) -> list[str]:
    owned: dict[str, tuple[str, str]] = {}
    for start in range(0, len(outcomes), _FINISH_CHUNK):
        owned.update(await _update_fenced(conn, outcomes[start : start + _FINISH_CHUNK]))
    mine = [o for o in outcomes if o.message_id in owned]
    if not mine:
        return []
    tried = [_attempt_row(o) for o in mine if o.attempted]
    if tried:
        await _INSERT_ATTEMPTS.execute_many(conn, tried)
    now = now_ms()
    bounced = [
        {
            "account_id": owned[o.message_id][0],
            "email_lower": owned[o.message_id][1].lower(),
            "reason": "hard_bounce",
            "created_at": now,
        }
        for o in mine
        if o.status == "bounced"
    ]
    if bounced:
        await conn.execute(_ADD_SUPPRESSION[conn.dialect.name], bounced)
    # The events (and their webhooks) commit with the outcomes, or not at all.
    await events.record_many(conn, [_event_entry(o, *owned[o.message_id]) for o in mine])
    return [o.message_id for o in mine]


async def _update_fenced(
    conn: AsyncConnection, outcomes: Sequence[Outcome]
) -> dict[str, tuple[str, str]]:
    """message id -> (account id, recipient) for the outcomes whose lease was ours (ids
    are unique within a round)."""
    rows = orjson.dumps(
        [
            {
                "id": o.message_id,
                "token": o.lease_token,
                "status": o.status,
                "next_at": o.next_attempt_at,
                "code": o.code,
                "text": _text(o.text, _TEXT_LIMIT),
                "attempted": 1 if o.attempted else 0,
            }
            for o in outcomes
        ]
    ).decode()
    result = await _FINISH.execute(conn, {"rows": rows, "now": now_ms()})
    found: list[Any] = list(result)  # (id, account id, recipient) rows
    return {row[0]: (row[1], row[2]) for row in found}


def _attempt_row(outcome: Outcome) -> dict[str, Any]:
    return {
        "message_id": outcome.message_id,
        "started_at": outcome.started_at,
        "duration_ms": outcome.duration_ms,
        "host": outcome.host,
        "outcome": outcome.status,
        "code": outcome.code,
        "text": _text(outcome.text, _TEXT_LIMIT),
    }


def _event_entry(
    outcome: Outcome, account_id: str, to_addr: str
) -> tuple[str, str | None, str, dict[str, Any]]:
    data = {
        "email": to_addr,
        "code": outcome.code,
        "text": _text(outcome.text, 500),
        "host": outcome.host,
        "nextAttemptAt": outcome.next_attempt_at,
    }
    return (account_id, outcome.message_id, outcome.status, data)


def _text(value: str, limit: int) -> str:
    # A remote reply is the remote's bytes: aiosmtplib keeps undecodable ones as lone
    # surrogates (which no JSON encoder takes), and PostgreSQL text cannot hold NUL. A
    # garbled reply must not stop a batch.
    cut = value[:limit]
    if cut.isascii():
        return cut.replace("\x00", "")
    return cut.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")


_RELEASE = (
    messages.update()
    .where(
        messages.c.id == sa.bindparam("message_id", type_=sa.String),
        messages.c.lease_token == sa.bindparam("token", type_=sa.String),
    )
    .values(
        status=sa.bindparam("new_status", type_=sa.String),
        lease_token=None,
        lease_expires_at=None,
        next_attempt_at=sa.bindparam("now", type_=sa.BigInteger),
        updated_at=sa.bindparam("now", type_=sa.BigInteger),
    )
)


async def release(db: Database, claimed: Sequence[Claimed]) -> None:
    """Give back claims that were never started (graceful shutdown): due again now."""
    if not claimed:
        return
    now = now_ms()
    params = [
        {
            "message_id": item.id,
            "token": item.lease_token,
            "new_status": "queued" if item.attempts == 0 else "deferred",
            "now": now,
        }
        for item in claimed
    ]

    async def give_back(conn: AsyncConnection) -> None:
        await conn.execute(_RELEASE, params)

    await db.write(give_back)


async def counts_by_status(db: Database) -> dict[str, int]:
    async with db.read() as conn:
        rows = await conn.execute(
            sa.select(messages.c.status, sa.func.count()).group_by(messages.c.status)
        )
        return {status: int(n) for status, n in rows}
