"""Dashboard users: sign-up, login checks, sessions, and the activation and reset links.

A session is a server-side row; the cookie carries a random id of which the database keeps
only the SHA-256, so a copy of the database opens no session. Every login issues a new id.

Links are HMACs from the server's secret key (`SecretBox.mac`), each with its expiry:
- activation: `user.expiry.mac(activate, user, account, expiry)`;
- password reset: the MAC also covers the current password hash, so a link stops working
  as soon as the password changes (used once, or reset another way).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from functools import cache
from typing import Any

import sqlalchemy as sa
from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.strategies import MovingWindowRateLimiter
from sqlalchemy.exc import IntegrityError

from sendkit import accounts
from sendkit.accounts import Account
from sendkit.addresses import parse_mailbox
from sendkit.crypto import SecretBox
from sendkit.db import Database, now_ms, sessions, users
from sendkit.db import accounts as accounts_table
from sendkit.errors import BadRequest, InvalidCredentials, InvalidToken, NotFound, RateLimited
from sendkit.ratelimit import RateLimiter

MIN_PASSWORD = 8
MAX_PASSWORD = 1024  # argon2 takes any length; this only bounds the work per attempt


@cache
def _dummy_hash() -> str:
    """Verified against when the email is unknown, so both cases take the same time."""
    return accounts.hash_password(secrets.token_urlsafe(16))


@dataclass(frozen=True)
class User:
    id: str
    account_id: str
    email: str
    is_operator: bool
    password_hash: str

    @classmethod
    def from_row(cls, row: Any) -> User:
        return cls(row.id, row.account_id, row.email, row.is_operator, row.password_hash)


@dataclass(frozen=True)
class SignedUp:
    account_id: str
    user: User


@dataclass(frozen=True)
class Session:
    """A signed-in user as a request sees it."""

    token_hash: str
    csrf_token: str
    expires_at: int
    user: User
    account: Account


@dataclass(frozen=True)
class NewSession:
    token: str  # goes into the cookie, nowhere else
    csrf_token: str
    expires_at: int


def normalise_email(email: str) -> str:
    try:
        return parse_mailbox(email.strip()).lower
    except ValueError as exc:
        raise BadRequest(f"Bad request parameters: 'email' {exc}") from None


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise BadRequest(
            f"Bad request parameters: 'password' must have at least {MIN_PASSWORD} characters"
        )
    if len(password) > MAX_PASSWORD:
        raise BadRequest("Bad request parameters: 'password' is too long")
    return password


# --- users ------------------------------------------------------------------------------


async def find_by_email(db: Database, email: str) -> User | None:
    async with db.read() as conn:
        row = (await conn.execute(users.select().where(users.c.email == email))).first()
    return User.from_row(row) if row is not None else None


async def get(db: Database, user_id: str) -> User:
    async with db.read() as conn:
        row = (await conn.execute(users.select().where(users.c.id == user_id))).first()
    if row is None:
        raise NotFound("User not found")
    return User.from_row(row)


async def signup(db: Database, account_name: str, email: str, password: str) -> SignedUp:
    """A new, inactive account and its owner; the owner activates it from an email link."""
    address = normalise_email(email)
    check_password(password)
    if not account_name.strip():
        raise BadRequest("Bad request parameters: 'account name' is required")
    if await find_by_email(db, address) is not None:
        raise BadRequest("An account with this email address already exists: log in instead")
    account_id = await accounts.create(db, account_name[:200], active=False)
    try:
        user_id = await accounts.create_user(db, account_id, address, password)
    except IntegrityError:
        # The same address signed up at the same moment: that one wins.
        await _delete_account(db, account_id)
        raise BadRequest("An account with this email address already exists") from None
    return SignedUp(account_id, await get(db, user_id))


async def _delete_account(db: Database, account_id: str) -> None:
    async with db.begin() as conn:
        await conn.execute(accounts_table.delete().where(accounts_table.c.id == account_id))


async def authenticate(db: Database, email: str, password: str) -> User:
    """The user with this email and password; otherwise InvalidCredentials (same time)."""
    try:
        address = normalise_email(email)
    except BadRequest:
        address = ""
    user = await find_by_email(db, address) if address else None
    candidate = user.password_hash if user is not None else _dummy_hash()
    matches = accounts.password_matches(candidate, password[:MAX_PASSWORD])
    if user is None or not matches:
        raise InvalidCredentials()
    return user


async def set_password(db: Database, user_id: str, password: str) -> None:
    """Change the password and end every session of the user."""
    check_password(password)
    async with db.begin() as conn:
        await conn.execute(
            users.update()
            .where(users.c.id == user_id)
            .values(password_hash=accounts.hash_password(password))
        )
        await conn.execute(sessions.delete().where(sessions.c.user_id == user_id))


# --- sessions ---------------------------------------------------------------------------


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def start_session(
    db: Database, user_id: str, lifetime_ms: int, *, replaces: str | None = None
) -> NewSession:
    """A new session id (never the one the browser had before login)."""
    token = secrets.token_urlsafe(32)
    new = NewSession(token, secrets.token_urlsafe(32), now_ms() + lifetime_ms)
    async with db.begin() as conn:
        if replaces:
            await conn.execute(sessions.delete().where(sessions.c.id == _hash(replaces)))
        await conn.execute(
            sessions.delete().where(sessions.c.user_id == user_id, sessions.c.expires_at < now_ms())
        )
        await conn.execute(
            sessions.insert().values(
                id=_hash(token),
                user_id=user_id,
                csrf_token=new.csrf_token,
                created_at=now_ms(),
                expires_at=new.expires_at,
            )
        )
    return new


async def load_session(db: Database, token: str) -> Session | None:
    """The live session behind a cookie value, with its user and account; None otherwise."""
    if not token or len(token) > 100:
        return None
    query = (
        sa.select(
            sessions.c.id.label("token_hash"),
            sessions.c.csrf_token,
            sessions.c.expires_at,
            users,
        )
        .join(users, users.c.id == sessions.c.user_id)
        .where(sessions.c.id == _hash(token), sessions.c.expires_at > now_ms())
    )
    async with db.read() as conn:
        row = (await conn.execute(query)).first()
        if row is None:
            return None
        account = await accounts.get(conn, row.account_id)
    return Session(row.token_hash, row.csrf_token, row.expires_at, User.from_row(row), account)


async def end_session(db: Database, token: str) -> None:
    async with db.begin() as conn:
        await conn.execute(sessions.delete().where(sessions.c.id == _hash(token)))


# --- links ------------------------------------------------------------------------------


def activation_token(box: SecretBox, user: User, expires_at: int) -> str:
    mac = box.mac("activate", user.id, user.account_id, str(expires_at))
    return f"{user.id}.{expires_at}.{mac}"


def reset_token(box: SecretBox, user: User, expires_at: int) -> str:
    mac = box.mac("reset", user.id, str(expires_at), user.password_hash)
    return f"{user.id}.{expires_at}.{mac}"


def _split_token(token: str) -> tuple[str, int, str]:
    parts = token.strip().split(".")
    if len(parts) != 3 or not parts[1].isdigit() or len(token) > 200:
        raise InvalidToken()
    expires_at = int(parts[1])
    if expires_at < now_ms():
        raise InvalidToken()
    return parts[0], expires_at, parts[2]


async def _user_for(db: Database, user_id: str) -> User:
    try:
        return await get(db, user_id)
    except NotFound:
        raise InvalidToken() from None


async def activate(db: Database, box: SecretBox, token: str) -> User:
    """Follow an activation link: the owner's account becomes active (idempotent). An
    account an operator deactivated stays off: links only ever activate a new account."""
    user_id, expires_at, mac = _split_token(token)
    user = await _user_for(db, user_id)
    expected = activation_token(box, user, expires_at).rsplit(".", 1)[1]
    if not hmac.compare_digest(expected, mac):
        raise InvalidToken()
    account = await accounts.load(db, user.account_id)
    if account.deactivated:
        raise InvalidToken("This account was deactivated by an instance operator")
    if not account.active:
        await accounts.set_active(db, user.account_id, True)
    return user


async def check_reset_token(db: Database, box: SecretBox, token: str) -> User:
    user_id, expires_at, mac = _split_token(token)
    user = await _user_for(db, user_id)
    expected = reset_token(box, user, expires_at).rsplit(".", 1)[1]
    if not hmac.compare_digest(expected, mac):
        raise InvalidToken()
    return user


async def reset_password(db: Database, box: SecretBox, token: str, password: str) -> User:
    """Set a new password from a reset link; the link (and every session) stops working."""
    check_password(password)
    user = await check_reset_token(db, box, token)
    await set_password(db, user.id, password)
    return user


# --- throttling -------------------------------------------------------------------------


class Throttle:
    """Attempts per minute for one purpose, over the same storage as the API's limits
    (memory, or Redis shared by every process)."""

    def __init__(self, limiter: RateLimiter, purpose: str, per_minute: int) -> None:
        self._strategy = MovingWindowRateLimiter(limiter.storage)
        self._purpose = purpose
        self._item: RateLimitItem = RateLimitItemPerMinute(per_minute)

    async def hit(self, *key: str) -> None:
        """Count one attempt; over the limit raises RateLimited with Retry-After."""
        ident = hashlib.sha256("\x1f".join(key).encode()).hexdigest()
        if await self._strategy.hit(self._item, "dashboard", self._purpose, ident):
            return
        stats = await self._strategy.get_window_stats(self._item, "dashboard", self._purpose, ident)
        retry = max(1, int(stats.reset_time - now_ms() / 1000) + 1)
        raise RateLimited(
            f"Too many attempts: try again in {retry} seconds",
            headers={"Retry-After": str(retry)},
        )
