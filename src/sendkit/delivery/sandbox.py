"""The sandbox transport: nothing leaves the machine; the message lands in the inbox table."""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from sendkit.db import Database, inbox, messages, now_ms
from sendkit.delivery.transports import DeliveryResult, Envelope


class SandboxTransport:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def send(self, envelope: Envelope) -> DeliveryResult:
        started = time.perf_counter()
        account_id = sa.select(messages.c.account_id).where(messages.c.id == envelope.message_id)
        raw = b"Return-Path: <" + envelope.mail_from.encode() + b">\r\n" + envelope.data

        async def keep(conn: AsyncConnection) -> None:
            # A retried message replaces its earlier copy: the inbox shows what was delivered.
            await conn.execute(inbox.delete().where(inbox.c.message_id == envelope.message_id))
            await conn.execute(
                inbox.insert().from_select(
                    ["message_id", "account_id", "raw", "received_at"],
                    sa.select(
                        sa.literal(envelope.message_id),
                        account_id.scalar_subquery(),
                        sa.literal(raw, sa.LargeBinary),
                        sa.literal(now_ms()),
                    ),
                )
            )

        await self._db.write(keep)
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
