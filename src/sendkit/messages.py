"""submit(): the one way a message enters SendKit, and the message log."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from sendkit import apps, domains, events, suppressions
from sendkit.accounts import Account, utc_today
from sendkit.addresses import Mailbox, parse_mailbox
from sendkit.contacts import AppId, Status
from sendkit.db import Database, attempts, contacts, daily_usage, messages, now_ms
from sendkit.errors import DailyLimitReached, MessageTooLarge
from sendkit.validation import no_crlf

# Headers the builder adds around the user's fields; counted so `size` is honest.
_HEADER_OVERHEAD = 512


class SendRequest(BaseModel):
    """The documented `POST /v1/send` payload."""

    model_config = ConfigDict(extra="forbid")

    from_: str = Field(alias="from", min_length=3, max_length=400)
    to: str = Field(min_length=3, max_length=400)
    subject: str = Field(min_length=1, max_length=2000)
    body: str = Field(min_length=1)
    # Optional: ties the message to an app's contact list (List-Unsubscribe, unsubscribes).
    appId: AppId | None = None

    @field_validator("from_", "to")
    @classmethod
    def _mailbox(cls, value: str) -> str:
        return parse_mailbox(value).header

    @field_validator("subject")
    @classmethod
    def _subject(cls, value: str) -> str:
        return no_crlf(value)

    @property
    def sender(self) -> Mailbox:
        return parse_mailbox(self.from_)

    @property
    def recipient(self) -> Mailbox:
        return parse_mailbox(self.to)

    def size(self) -> int:
        return _HEADER_OVERHEAD + sum(
            len(v.encode("utf-8", "surrogatepass"))
            for v in (self.from_, self.to, self.subject, self.body)
        )


@dataclass(frozen=True)
class Accepted:
    message_id: str
    status: str


async def submit(db: Database, account: Account, request: SendRequest, request_id: str) -> Accepted:
    """Checks 5 (appId) to 9 of the documented order, then commits the message as queued
    (or as suppressed: recorded, never attempted) with its event, in one transaction."""
    app_pk = await _app_pk(db, account.id, request.appId)
    if request.size() > account.max_message_size:
        raise MessageTooLarge()
    sender = request.sender
    await domains.check_sender(db, account.id, sender)
    recipient = request.recipient
    message_id = secrets.token_hex(16)
    now = now_ms()

    async def store(conn: AsyncConnection) -> str:
        await _count_against_daily_limit(conn, account)
        # Accepted, but never attempted: the address bounced or complained before, or left
        # the app's list.
        reason = await _suppression_reason(conn, account.id, recipient.lower, app_pk)
        suppressed = reason is not None
        status = "suppressed" if suppressed else "queued"
        await conn.execute(
            messages.insert().values(
                id=message_id,
                request_id=request_id,
                account_id=account.id,
                app_pk=app_pk,
                from_header=request.from_,
                from_addr=sender.lower,
                to_header=request.to,
                to_addr=recipient.lower,
                subject=request.subject,
                body=request.body,
                size=request.size(),
                status=status,
                attempts=0,
                next_attempt_at=None if suppressed else now,
                created_at=now,
                updated_at=now,
            )
        )
        data = {
            "email": recipient.lower,
            "from": sender.lower,
            "subject": request.subject,
            "requestId": request_id,
            "appId": request.appId,
        }
        if reason is not None:
            data["reason"] = reason
        await events.record(conn, account.id, message_id, status, data)
        return status

    # Group commit: this request shares its transaction (and fsync) with its neighbours.
    status = await db.write(store, savepoint=False)
    return Accepted(message_id, status)


async def _app_pk(db: Database, account_id: str, app_id: str | None) -> str | None:
    if app_id is None:
        return None
    async with db.read() as conn:
        return (await apps.resolve(conn, account_id, app_id)).pk


async def _suppression_reason(
    conn: AsyncConnection, account_id: str, email: str, app_pk: str | None
) -> str | None:
    if await suppressions.is_suppressed(conn, account_id, email):
        return "suppression list"
    if app_pk is not None:
        status = await conn.scalar(
            sa.select(contacts.c.status).where(
                contacts.c.app_pk == app_pk, contacts.c.email_lower == email
            )
        )
        if status == Status.UNSUBSCRIBED.value:
            return "unsubscribed"
    return None


async def _count_against_daily_limit(conn: AsyncConnection, account: Account) -> None:
    """Atomic on both databases: the conditional UPDATE is the check."""
    day = utc_today().isoformat()
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    await conn.execute(
        insert(daily_usage)
        .values(account_id=account.id, day=day, sent=0)
        .on_conflict_do_nothing(index_elements=["account_id", "day"])
    )
    result = await conn.execute(
        daily_usage.update()
        .where(
            daily_usage.c.account_id == account.id,
            daily_usage.c.day == day,
            daily_usage.c.sent < account.daily_limit,
        )
        .values(sent=daily_usage.c.sent + 1)
    )
    if result.rowcount == 0:
        raise DailyLimitReached()


async def sent_today(db: Database, account_id: str) -> int:
    async with db.read() as conn:
        value = await conn.scalar(
            sa.select(daily_usage.c.sent).where(
                daily_usage.c.account_id == account_id,
                daily_usage.c.day == utc_today().isoformat(),
            )
        )
    return int(value or 0)


_PUBLIC_COLUMNS = [
    c for c in messages.c if c.name not in ("lease_token", "lease_expires_at", "body")
]


async def find(db: Database, ident: str, *, account_id: str | None = None) -> dict[str, Any] | None:
    """A message by its id or its requestId, with its delivery attempts; scoped to an
    account when one is given."""
    query = sa.select(*_PUBLIC_COLUMNS).where(
        sa.or_(messages.c.id == ident, messages.c.request_id == ident)
    )
    if account_id is not None:
        query = query.where(messages.c.account_id == account_id)
    async with db.read() as conn:
        row = (await conn.execute(query.limit(1))).first()
        if row is None:
            return None
        found = dict(row._mapping)
        rows = await conn.execute(
            sa.select(attempts).where(attempts.c.message_id == row.id).order_by(attempts.c.id)
        )
        found["attempts_log"] = [dict(r._mapping) for r in rows]
        found["events"] = await events.for_message(conn, row.id)
    return found
