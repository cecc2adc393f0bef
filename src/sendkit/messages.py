"""submit(): the one way a message enters SendKit, and the message log."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from sendkit import apps, domains, events, ids, suppressions, unsubscribe
from sendkit.accounts import Account, utc_today
from sendkit.addresses import Mailbox, parse_mailbox
from sendkit.contacts import AppId, Status
from sendkit.db import Database, ReadThenWrite, attempts, daily_usage, messages, now_ms
from sendkit.errors import DailyLimitReached, MessageTooLarge
from sendkit.prepared import Prepared
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
    size = request.size()
    if size > account.max_message_size:
        raise MessageTooLarge()
    sender = request.sender
    await domains.check_sender(db, account.id, sender)
    recipient = request.recipient
    message_id = ids.message_id()
    now = now_ms()
    row = {
        "id": message_id,
        "request_id": request_id,
        "account_id": account.id,
        "app_pk": app_pk,
        "from_header": request.from_,
        "from_addr": sender.lower,
        "to_header": request.to,
        "to_addr": recipient.lower,
        "subject": request.subject,
        "body": request.body,
        "size": size,
        "attempts": 0,
        "created_at": now,
        "updated_at": now,
    }
    data = {
        "email": recipient.lower,
        "from": sender.lower,
        "subject": request.subject,
        "requestId": request_id,
        "appId": request.appId,
    }
    # Group commit: this request shares its transaction (and fsync) with its neighbours,
    # and the batch handler serves them all with a few set-based statements.
    status = await db.write_batch(_STORE, _Pending(account, row, data))
    return Accepted(message_id, status)


async def _app_pk(db: Database, account_id: str, app_id: str | None) -> str | None:
    if app_id is None:
        return None
    async with db.read() as conn:
        return (await apps.resolve(conn, account_id, app_id)).pk


@dataclass(frozen=True)
class _Pending:
    account: Account
    row: dict[str, Any]
    event_data: dict[str, Any]


async def _store(
    conn: AsyncConnection, items: list[_Pending], reasons: dict[str, str]
) -> list[Any]:
    """Check 9 (daily limit) for many sends, then one insert of the messages and one of
    their events. On PostgreSQL the daily count's row stays locked until the commit: the
    suppression reads came before it."""
    accepted = await _take_daily_quota(conn, items)
    results: list[Any] = [None] * len(items)
    rows: list[dict[str, Any]] = []
    entries: list[tuple[str, str | None, str, dict[str, Any]]] = []
    for i in accepted:
        item = items[i]
        # Accepted, but never attempted: the address bounced or complained before, or
        # left the app's list.
        reason = reasons.get(item.row["id"])
        status = "queued" if reason is None else "suppressed"
        next_at = item.row["created_at"] if reason is None else None
        rows.append(item.row | {"status": status, "next_attempt_at": next_at})
        data = item.event_data if reason is None else item.event_data | {"reason": reason}
        entries.append((item.account.id, item.row["id"], status, data))
        results[i] = status
    if rows:
        await _INSERT_MESSAGES.execute_many(conn, rows)
        await events.record_many(conn, entries)
    # An error each, made only for the sends refused: one per send cost 1 % of the CPU.
    return [DailyLimitReached() if result is None else result for result in results]


async def _take_daily_quota(conn: AsyncConnection, items: list[_Pending]) -> list[int]:
    """Which of the items fit under their account's daily limit (UTC day), counted once
    per account. The row is locked (PostgreSQL) or the writer is single (SQLite), so
    concurrent processes never overshoot."""
    day = utc_today().isoformat()
    by_account: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_account.setdefault(item.account.id, []).append(i)
    accepted: list[int] = []
    # Accounts in one order everywhere: two processes' groups lock their usage rows
    # (PostgreSQL) in the same order, so they wait for each other instead of deadlocking.
    for account_id in sorted(by_account):
        indexes = by_account[account_id]
        limit = items[indexes[0]].account.daily_limit
        if len(indexes) <= limit and await _take_all(conn, account_id, day, len(indexes), limit):
            accepted.extend(indexes)
        else:
            accepted.extend(await _take_some(conn, account_id, day, indexes, limit))
    return sorted(accepted)


def _insert(dialect: str) -> Any:
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


def _take_all_statement(dialect: str) -> Any:
    statement = _insert(dialect)(daily_usage).values(
        account_id=sa.bindparam("account_id"), day=sa.bindparam("day"), sent=sa.bindparam("count")
    )
    return statement.on_conflict_do_update(
        index_elements=["account_id", "day"],
        set_={"sent": daily_usage.c.sent + statement.excluded.sent},
        where=daily_usage.c.sent + statement.excluded.sent
        <= sa.bindparam("daily_limit", type_=sa.Integer),
    ).returning(daily_usage.c.sent)


_TAKE_ALL = Prepared(_take_all_statement)
_MESSAGE_COLUMNS = (
    "id",
    "request_id",
    "account_id",
    "app_pk",
    "from_header",
    "from_addr",
    "to_header",
    "to_addr",
    "subject",
    "body",
    "size",
    "attempts",
    "created_at",
    "updated_at",
    "status",
    "next_attempt_at",
)
_INSERT_MESSAGES = Prepared(
    lambda _: messages.insert().values({c: sa.bindparam(c) for c in _MESSAGE_COLUMNS}),
    multi_row=True,
)


async def _take_all(
    conn: AsyncConnection, account_id: str, day: str, count: int, limit: int
) -> bool:
    """The usual case in one statement: all `count` fit, and are counted."""
    params = {"account_id": account_id, "day": day, "count": count, "daily_limit": limit}
    return (await _TAKE_ALL.execute(conn, params)).first() is not None


async def _take_some(
    conn: AsyncConnection, account_id: str, day: str, indexes: list[int], limit: int
) -> list[int]:
    """Near the limit: as many as there is room for, in order."""
    await conn.execute(
        _insert(conn.dialect.name)(daily_usage)
        .values(account_id=account_id, day=day, sent=0)
        .on_conflict_do_nothing(index_elements=["account_id", "day"])
    )
    key = (daily_usage.c.account_id == account_id, daily_usage.c.day == day)
    query = sa.select(daily_usage.c.sent).where(*key)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    sent = int(await conn.scalar(query) or 0)
    taken = indexes[: max(0, limit - sent)]
    if taken:
        await conn.execute(
            daily_usage.update().where(*key).values(sent=daily_usage.c.sent + len(taken))
        )
    return taken


async def _suppression_reasons(conn: AsyncConnection, items: list[_Pending]) -> dict[str, str]:
    """message id -> why it will not be attempted, for the items that will not be."""
    pairs = [(item.account.id, item.row["to_addr"]) for item in items]
    suppressed = await suppressions.suppressed_among(conn, pairs)
    reasons = {
        item.row["id"]: "suppression list"
        for item in items
        if (item.account.id, item.row["to_addr"]) in suppressed
    }
    listed = [(item.row["app_pk"], item.row["to_addr"]) for item in items if item.row["app_pk"]]
    members = await unsubscribe.memberships(conn, listed)
    for item in items:
        member = members.get((item.row["app_pk"], item.row["to_addr"]))
        unsubscribed = member is not None and member.status == Status.UNSUBSCRIBED.value
        if unsubscribed and item.row["id"] not in reasons:
            reasons[item.row["id"]] = "unsubscribed"
    return reasons


# The suppression lists are read before the write lock (on SQLite): the worker checks
# them again before each attempt, so a snapshot a moment old only decides whether a
# message is marked suppressed now or then. The webhook endpoints are read in the
# transaction (`events.record_many`): an event must reach every endpoint that existed
# when it committed.
_STORE = ReadThenWrite(_suppression_reasons, _store)


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
