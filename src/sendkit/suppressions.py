"""The per-account suppression list: addresses SendKit will not attempt again.

Hard bounces and complaints add themselves; people add and remove addresses by hand in
the dashboard or through `/v1/suppressions`. A send to a listed address is still recorded
(status and event `suppressed`), but never attempted.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Collection
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from sendkit import csvcells
from sendkit.addresses import parse_mailbox
from sendkit.db import Database, now_ms, suppressions
from sendkit.errors import NotFound
from sendkit.prepared import Prepared, json_rows, rows_param


class Reason(StrEnum):
    HARD_BOUNCE = "hard_bounce"
    COMPLAINT = "complaint"
    MANUAL = "manual"


async def add(conn: AsyncConnection, account_id: str, email: str, reason: str) -> bool:
    """Idempotent; the first reason stays. True when the address was not listed before."""
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    result = await conn.execute(
        insert(suppressions)
        .values(
            account_id=account_id, email_lower=email.lower(), reason=reason, created_at=now_ms()
        )
        .on_conflict_do_nothing(index_elements=["account_id", "email_lower"])
    )
    return bool(result.rowcount)


async def is_suppressed(conn: AsyncConnection, account_id: str, email: str) -> bool:
    found = await conn.scalar(
        sa.select(suppressions.c.reason).where(
            suppressions.c.account_id == account_id,
            suppressions.c.email_lower == email.lower(),
        )
    )
    return found is not None


_SUPPRESSED_AMONG = Prepared(
    lambda dialect: sa.select(suppressions.c.account_id, suppressions.c.email_lower).where(
        sa.tuple_(suppressions.c.account_id, suppressions.c.email_lower).in_(json_rows(dialect, 2))
    )
)


async def suppressed_among(
    conn: AsyncConnection, recipients: Collection[tuple[str, str]]
) -> set[tuple[str, str]]:
    """Which (account_id, email) pairs are suppressed: one query for a worker's batch.
    The answer's emails are lower-cased."""
    if not recipients:
        return set()
    pairs = sorted({(account_id, email.lower()) for account_id, email in recipients})
    rows = await _SUPPRESSED_AMONG.execute(conn, rows_param(pairs))
    return {(r.account_id, r.email_lower) for r in rows}


# --- managing the list (API and dashboard) -----------------------------------------------


def _bare_address(value: str) -> str:
    if "<" in value:
        raise ValueError("must be a bare email address")
    return parse_mailbox(value).lower


class AddSuppression(BaseModel):
    model_config = ConfigDict(extra="forbid")

    emailAddress: str = Field(min_length=3, max_length=320)
    reason: Reason = Reason.MANUAL

    @field_validator("emailAddress")
    @classmethod
    def _email(cls, value: str) -> str:
        return _bare_address(value)


class SuppressionKey(BaseModel):
    model_config = ConfigDict(extra="ignore")

    emailAddress: str = Field(min_length=1, max_length=320)


class SuppressionQuery(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    q: str = Field(default="", max_length=320)  # part of the address
    reason: Reason | None = None
    page: int = Field(default=1, ge=1, le=10_000_000)
    pageSize: int = Field(default=100, ge=1, le=1000)


def to_api(row: Any) -> dict[str, Any]:
    return {"emailAddress": row.email_lower, "reason": row.reason, "createdAt": row.created_at}


async def add_manual(db: Database, account_id: str, request: AddSuppression) -> bool:
    async with db.begin() as conn:
        return await add(conn, account_id, request.emailAddress, request.reason.value)


async def remove(db: Database, account_id: str, email: str) -> None:
    """Take an address off the list; one that is not listed answers 404 (100033)."""
    async with db.begin() as conn:
        result = await conn.execute(
            suppressions.delete().where(
                suppressions.c.account_id == account_id,
                suppressions.c.email_lower == email.strip().lower(),
            )
        )
    if result.rowcount == 0:
        raise NotFound("Bad request parameters: address not found for 'emailAddress'")


def _where(account_id: str, query: SuppressionQuery) -> list[Any]:
    where: list[Any] = [suppressions.c.account_id == account_id]
    if query.reason is not None:
        where.append(suppressions.c.reason == query.reason.value)
    if query.q:
        escaped = query.q.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        where.append(suppressions.c.email_lower.like(f"%{escaped}%", escape="\\"))
    return where


async def list_page(db: Database, account_id: str, query: SuppressionQuery) -> dict[str, Any]:
    """Newest first, like a log: the latest bounce is the one people look for."""
    where = _where(account_id, query)
    async with db.read() as conn:
        total = await conn.scalar(
            sa.select(sa.func.count()).select_from(suppressions).where(*where)
        )
        rows = await conn.execute(
            sa.select(suppressions)
            .where(*where)
            .order_by(suppressions.c.created_at.desc(), suppressions.c.email_lower)
            .limit(query.pageSize)
            .offset((query.page - 1) * query.pageSize)
        )
        items = [to_api(r) for r in rows]
    return {"total": total or 0, "page": query.page, "pageSize": query.pageSize, "list": items}


_EXPORT_BATCH = 1000


async def export_csv(db: Database, account_id: str) -> AsyncIterator[bytes]:
    """The whole list as CSV (`email,reason,created_at`), streamed in keyset batches so a
    long list never sits in memory whole."""
    yield b"email,reason,created_at\r\n"
    after = ""
    while True:
        async with db.read() as conn:
            rows = (
                await conn.execute(
                    sa.select(suppressions)
                    .where(suppressions.c.account_id == account_id)
                    .where(suppressions.c.email_lower > after)
                    .order_by(suppressions.c.email_lower)
                    .limit(_EXPORT_BATCH)
                )
            ).all()
        if not rows:
            return
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        for row in rows:
            writer.writerow([csvcells.escape(row.email_lower), row.reason, row.created_at])
        yield out.getvalue().encode()
        after = rows[-1].email_lower
