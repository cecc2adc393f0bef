"""Accounts, their plans and subscriptions, and the users who own them."""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerifyMismatchError
from sqlalchemy.ext.asyncio import AsyncConnection

from sendkit.db import Database, accounts, now_ms, users
from sendkit.errors import (
    AccountNotActivated,
    BadRequest,
    NotFound,
    SubscriptionExpired,
)

_hasher = PasswordHasher()  # argon2id with the library's current recommended cost


@dataclass(frozen=True)
class Account:
    id: str
    name: str
    active: bool
    rate_per_second: int
    daily_limit: int
    max_message_size: int
    expires_on: str | None
    activated_at: int | None = None  # first activation; with `active` false: deactivated

    @property
    def deactivated(self) -> bool:
        """Inactive after having been active: an operator turned it off."""
        return not self.active and self.activated_at is not None

    @classmethod
    def from_row(cls, row: Any) -> Account:
        return cls(
            id=row.id,
            name=row.name,
            active=row.active,
            rate_per_second=row.rate_per_second,
            daily_limit=row.daily_limit,
            max_message_size=row.max_message_size,
            expires_on=row.expires_on,
            activated_at=getattr(row, "activated_at", None),
        )


def new_id() -> str:
    return secrets.token_hex(16)


def utc_today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def ensure_usable(account: Account, today: dt.date) -> None:
    """Checks 2 and 3 of the documented order: activation, then subscription."""
    if not account.active:
        raise AccountNotActivated()
    if account.expires_on is not None and dt.date.fromisoformat(account.expires_on) < today:
        raise SubscriptionExpired()


async def create(
    db: Database,
    name: str,
    *,
    active: bool = False,
    is_demo: bool = False,
    is_system: bool = False,
    daily_limit: int = 10_000,
) -> str:
    if not name.strip():
        raise BadRequest("Bad request parameters: 'name' is required")
    account_id = new_id()
    async with db.begin() as conn:
        await conn.execute(
            accounts.insert().values(
                id=account_id,
                name=name.strip(),
                active=active,
                is_demo=is_demo,
                is_system=is_system,
                rate_per_second=5,
                daily_limit=daily_limit,
                max_message_size=10 * 1024 * 1024,
                created_at=now_ms(),
                activated_at=now_ms() if active else None,
            )
        )
    return account_id


async def get(conn: AsyncConnection, account_id: str) -> Account:
    row = (await conn.execute(accounts.select().where(accounts.c.id == account_id))).first()
    if row is None:
        raise NotFound("Account not found")
    return Account.from_row(row)


async def load(db: Database, account_id: str) -> Account:
    async with db.read() as conn:
        return await get(conn, account_id)


async def set_active(db: Database, account_id: str, active: bool = True) -> None:
    if not active:
        await _update(db, account_id, active=False)
        return
    first = sa.func.coalesce(accounts.c.activated_at, now_ms())
    await _update(db, account_id, active=True, activated_at=first)


async def set_plan(
    db: Database,
    account_id: str,
    *,
    rate: int | None = None,
    daily: int | None = None,
    max_size: int | None = None,
    expires: str | None = None,
) -> Account:
    values: dict[str, Any] = {}
    for field, value in (("rate_per_second", rate), ("daily_limit", daily)):
        if value is not None:
            values[field] = _positive(field, value)
    if max_size is not None:
        values["max_message_size"] = _positive("max_message_size", max_size)
    if expires is not None:
        values["expires_on"] = _iso_date_or_none(expires)
    await _update(db, account_id, **values)
    return await load(db, account_id)


def _positive(field: str, value: int) -> int:
    if value < 1:
        raise BadRequest(f"Bad request parameters: '{field}' must be at least 1")
    return value


def _iso_date_or_none(value: str) -> str | None:
    if value in ("", "never", "none"):
        return None
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise BadRequest("Bad request parameters: 'expires' must be YYYY-MM-DD") from None


async def _update(db: Database, account_id: str, **values: Any) -> None:
    if not values:
        await load(db, account_id)
        return
    async with db.begin() as conn:
        result = await conn.execute(
            accounts.update().where(accounts.c.id == account_id).values(**values)
        )
        if result.rowcount == 0:
            raise NotFound("Account not found")


async def find_demo(db: Database) -> str | None:
    async with db.read() as conn:
        return await conn.scalar(
            sa.select(accounts.c.id).where(accounts.c.is_demo.is_(True)).limit(1)
        )


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def password_matches(stored_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash, password)
    except (VerifyMismatchError, InvalidHashError):
        return False


async def create_user(
    db: Database, account_id: str, email: str, password: str, *, is_operator: bool = False
) -> str:
    if len(password) < 8:
        raise BadRequest("Bad request parameters: 'password' must have at least 8 characters")
    user_id = new_id()
    async with db.begin() as conn:
        await conn.execute(
            users.insert().values(
                id=user_id,
                account_id=account_id,
                email=email.strip().lower(),
                password_hash=hash_password(password),
                role="owner",
                is_operator=is_operator,
                created_at=now_ms(),
            )
        )
    return user_id


async def find_system(db: Database) -> str | None:
    """The instance's own account (it sends activation and password-reset emails)."""
    async with db.read() as conn:
        return await conn.scalar(
            sa.select(accounts.c.id)
            .where(accounts.c.is_system.is_(True))
            .order_by(accounts.c.created_at)
            .limit(1)
        )


@dataclass(frozen=True)
class AccountSummary:
    """One line of the operator's account list."""

    account: Account
    is_demo: bool
    is_system: bool
    created_at: int
    owners: tuple[str, ...]


async def list_all(db: Database) -> list[AccountSummary]:
    """Every account with its owners' emails, newest first (instance operators only)."""
    async with db.read() as conn:
        rows = (await conn.execute(accounts.select().order_by(accounts.c.created_at.desc()))).all()
        owner_rows = await conn.execute(
            sa.select(users.c.account_id, users.c.email).order_by(users.c.created_at)
        )
        owners: dict[str, list[str]] = {}
        for account_id, email in owner_rows:
            owners.setdefault(account_id, []).append(email)
    return [
        AccountSummary(
            Account.from_row(r), r.is_demo, r.is_system, r.created_at, tuple(owners.get(r.id, ()))
        )
        for r in rows
    ]
