"""The sandbox transport: nothing leaves the machine; the message lands in the inbox table."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from sendkit import logs
from sendkit.db import Database, inbox, messages, now_ms
from sendkit.delivery.transports import DeliveryResult, Envelope
from sendkit.errors import SendKitError

log = logs.get("sendkit.sandbox")

# Built once. The account comes from the message itself; a message deleted meanwhile
# inserts nothing rather than failing the shared transaction.
_FORGET = inbox.delete().where(inbox.c.message_id.in_(sa.bindparam("ids", expanding=True)))
_KEEP = inbox.insert().from_select(
    ["message_id", "account_id", "raw", "received_at"],
    sa.select(
        messages.c.id,
        messages.c.account_id,
        sa.bindparam("raw", type_=sa.LargeBinary),
        sa.bindparam("received_at", type_=sa.BigInteger),
    ).where(messages.c.id == sa.bindparam("message_id", type_=sa.String)),
)


@dataclass(frozen=True)
class _Copy:
    message_id: str
    raw: bytes


async def _keep_batch(conn: AsyncConnection, copies: list[_Copy]) -> list[Any]:
    """Every sandbox delivery of one group commit: one delete and one executemany."""
    # A retried message replaces its earlier copy: the inbox shows what was delivered.
    latest = {copy.message_id: copy for copy in copies}
    now = now_ms()
    rows = [{"message_id": c.message_id, "raw": c.raw, "received_at": now} for c in latest.values()]
    try:
        # A savepoint: a failure here must not fail the API's sends in the same group.
        async with conn.begin_nested():
            await conn.execute(_FORGET, {"ids": list(latest)})
            await conn.execute(_KEEP, rows)
    except Exception as exc:  # every caller hears it as a value
        log.exception("sandbox_copy_failed", batch=len(copies))
        return [SendKitError(f"sandbox inbox write failed: {exc}") for _ in copies]
    return [None] * len(copies)


class SandboxTransport:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def send(self, envelope: Envelope) -> DeliveryResult:
        started = time.perf_counter()
        raw = b"Return-Path: <" + envelope.mail_from.encode() + b">\r\n" + envelope.data
        # Shares the group commit (and the statements) with every other copy kept meanwhile.
        try:
            await self._db.write_batch(_keep_batch, _Copy(envelope.message_id, raw))
        except SendKitError as exc:
            return DeliveryResult.deferred(
                f"4.3.0 {exc.message}", host="sandbox", duration=time.perf_counter() - started
            )
        return DeliveryResult.from_reply(
            250,
            "2.0.0 Ok: kept in the sandbox inbox",
            host="sandbox",
            duration=time.perf_counter() - started,
        )

    async def close(self) -> None:
        return None


async def raw_message(db: Database, message_id: str) -> bytes | None:
    async with db.read() as conn:
        value = await conn.scalar(sa.select(inbox.c.raw).where(inbox.c.message_id == message_id))
    return bytes(value) if value is not None else None
