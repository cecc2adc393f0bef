"""The event vocabulary and its dispatch: one word list for the message log, the API and
webhooks.

`record()` is a transactional outbox: it inserts the event and, in the same transaction,
one `webhook_deliveries` row per enabled endpoint of the account that wants this type.
Either both are committed with the change that caused the event, or neither is, so a
webhook is never sent for something that did not happen and never lost for something
that did. The webhook worker (`webhooks.py`) sends the rows later, at least once.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any

import orjson
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncConnection

from sendkit.db import Database, events, now_ms, webhook_deliveries, webhook_endpoints
from sendkit.prepared import Prepared, json_rows, rows_param


class EventType(StrEnum):
    QUEUED = "queued"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    FAILED = "failed"
    SUPPRESSED = "suppressed"
    COMPLAINED = "complained"
    UNSUBSCRIBED = "unsubscribed"


ALL_TYPES: tuple[str, ...] = tuple(t.value for t in EventType)
ANY = "*"


def iso(ms: int) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC with a `Z`, as webhooks carry time."""
    moment = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def webhook_payload(
    event_id: int, type_: str, message_id: str | None, data: dict[str, Any], created_at: int
) -> str:
    """The JSON body every endpoint receives for one event (Standard Webhooks shape)."""
    body = {
        "type": type_,
        "timestamp": iso(created_at),
        "data": {"eventId": event_id, "messageId": message_id, **data},
    }
    return orjson.dumps(body).decode()


def _new_id_sql(dialect: str) -> Any:
    """A random 32-hex id computed by the database, one per row of an INSERT ... SELECT."""
    if dialect == "postgresql":
        return sa.func.replace(sa.cast(sa.func.gen_random_uuid(), sa.Text), "-", "")
    return sa.func.lower(sa.func.hex(sa.func.randomblob(16)))


# Built once, executed with parameters: SQLAlchemy then reuses the compiled statement
# without even recomputing its cache key, which matters on the per-message hot path.
_INSERT_EVENT = events.insert().returning(events.c.id)
_DELIVERY_COLUMNS = [
    "id",
    "endpoint_id",
    "event_id",
    "payload",
    "status",
    "attempts",
    "next_attempt_at",
    "created_at",
    "updated_at",
]
_INSERT_DELIVERIES: dict[str, Any] = {}


def _insert_deliveries(dialect: str) -> Any:
    """Deliveries for the account's enabled endpoints that want the type. Endpoints store
    `*` or a comma-separated list; `,list,` LIKE `%,type,%` matches whole words only."""
    found = _INSERT_DELIVERIES.get(dialect)
    if found is not None:
        return found
    now = sa.bindparam("now", type_=sa.BigInteger)
    listed = sa.literal(",") + webhook_endpoints.c.events + sa.literal(",")
    targets = sa.select(
        _new_id_sql(dialect),
        webhook_endpoints.c.id,
        sa.bindparam("event_id", type_=sa.BigInteger),
        sa.bindparam("payload", type_=sa.Text),
        sa.literal("pending"),
        sa.literal(0),
        now,
        now,
        now,
    ).where(
        webhook_endpoints.c.account_id == sa.bindparam("account_id", type_=sa.String),
        webhook_endpoints.c.enabled.is_(True),
        sa.or_(
            webhook_endpoints.c.events == ANY,
            listed.like(sa.bindparam("pattern", type_=sa.String)),
        ),
    )
    found = webhook_deliveries.insert().from_select(_DELIVERY_COLUMNS, targets)
    _INSERT_DELIVERIES[dialect] = found
    return found


async def record(
    conn: AsyncConnection,
    account_id: str,
    message_id: str | None,
    type_: EventType | str,
    data: dict[str, Any] | None = None,
) -> int:
    """Insert one event and its webhook deliveries inside the caller's transaction.

    Two statements whatever the number of endpoints: the deliveries come from a single
    INSERT ... SELECT, which finds no rows (an index probe) for accounts without endpoints.
    """
    now = now_ms()
    row = _event_row(account_id, message_id, type_, data, now)
    event_id = int((await conn.execute(_INSERT_EVENT, row)).scalar_one())
    params = _delivery_params(row, data or {}, event_id, now)
    await conn.execute(_insert_deliveries(conn.dialect.name), params)
    return event_id


def _event_row(
    account_id: str,
    message_id: str | None,
    type_: EventType | str,
    data: dict[str, Any] | None,
    now: int,
) -> dict[str, Any]:
    return {
        "account_id": account_id,
        "message_id": message_id,
        "type": EventType(type_).value,
        "data": orjson.dumps(data or {}).decode(),
        "created_at": now,
    }


def _delivery_params(
    row: dict[str, Any], data: dict[str, Any], event_id: int, now: int
) -> dict[str, Any]:
    """The parameters of `_insert_deliveries` for one event row."""
    return {
        "account_id": row["account_id"],
        "event_id": event_id,
        "payload": webhook_payload(event_id, row["type"], row["message_id"], data, now),
        "now": now,
        "pattern": f"%,{row['type']},%",
    }


class EventQuery(BaseModel):
    """`GET /v1/events`: newest first, `before` = the last `id` seen."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    messageId: str | None = Field(default=None, min_length=1, max_length=64)
    type: EventType | None = None
    before: int | None = Field(default=None, ge=1)
    limit: int = Field(default=100, ge=1, le=1000)


def to_api(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "type": row.type,
        "messageId": row.message_id,
        "data": orjson.loads(row.data or "{}"),
        "createdAt": row.created_at,
    }


async def for_message(conn: AsyncConnection, message_id: str) -> list[dict[str, Any]]:
    """A message's events, oldest first (the message log's history)."""
    rows = await conn.execute(
        sa.select(events).where(events.c.message_id == message_id).order_by(events.c.id)
    )
    return [to_api(r) for r in rows]


async def list_for_account(
    db: Database, account_id: str, query: EventQuery
) -> list[dict[str, Any]]:
    """An account's events, newest first."""
    select = sa.select(events).where(events.c.account_id == account_id)
    if query.messageId is not None:
        select = select.where(events.c.message_id == query.messageId)
    if query.type is not None:
        select = select.where(events.c.type == query.type.value)
    if query.before is not None:
        select = select.where(events.c.id < query.before)
    async with db.read() as conn:
        rows = await conn.execute(select.order_by(events.c.id.desc()).limit(query.limit))
        return [to_api(r) for r in rows]


_HOOKED_ACCOUNTS = Prepared(
    lambda dialect: (
        sa.select(webhook_endpoints.c.account_id)
        .where(webhook_endpoints.c.account_id.in_(json_rows(dialect, 1)))
        .distinct()
    )
)
# Several rows with RETURNING in the order given: SQLAlchemy batches them ("insertmanyvalues")
# and matches each returned id to its parameters.
_INSERT_EVENTS_RETURNING = events.insert().returning(events.c.id, sort_by_parameter_order=True)
_INSERT_EVENTS = Prepared(
    lambda _: events.insert().values(
        {c: sa.bindparam(c) for c in ("account_id", "message_id", "type", "data", "created_at")}
    ),
    multi_row=True,
)


async def record_many(
    conn: AsyncConnection, entries: list[tuple[str, str | None, str, dict[str, Any]]]
) -> None:
    """`record` for a batch of (account_id, message_id, type, data), with a fixed number of
    statements whatever its size: which accounts have endpoints, one insert of the events
    of the others, and for accounts with endpoints one insert of their events (ids
    returned) plus one executemany of the deliveries' INSERT ... SELECT."""
    if not entries:
        return
    account_ids = rows_param([[a] for a in sorted({entry[0] for entry in entries})])
    hooked = set((await _HOOKED_ACCOUNTS.execute(conn, account_ids)).scalars())
    now = now_ms()
    plain: list[dict[str, Any]] = []
    hooked_rows: list[dict[str, Any]] = []
    hooked_data: list[dict[str, Any]] = []
    for account_id, message_id, type_, data in entries:
        row = _event_row(account_id, message_id, type_, data, now)
        if account_id in hooked:
            hooked_rows.append(row)
            hooked_data.append(data or {})
        else:
            plain.append(row)
    if plain:
        await _INSERT_EVENTS.execute_many(conn, plain)
    if not hooked_rows:
        return
    ids = (await conn.execute(_INSERT_EVENTS_RETURNING, hooked_rows)).scalars().all()
    deliveries = [
        _delivery_params(row, data, int(event_id), now)
        for row, data, event_id in zip(hooked_rows, hooked_data, ids, strict=True)
    ]
    await conn.execute(_insert_deliveries(conn.dialect.name), deliveries)
