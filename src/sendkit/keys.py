"""API keys (create, hash, look up, revoke) and HMAC-SHA256 request signatures.

A key is `sk_` followed by 32 random bytes (URL-safe base64). The database keeps its
SHA-256 (keys carry 256 bits of entropy, so a slow hash adds nothing) and a visible
prefix; the plain key exists only in the response that created it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from sendkit.accounts import Account, new_id
from sendkit.crypto import SecretBox
from sendkit.db import Database, accounts, api_keys, now_ms
from sendkit.errors import InvalidSignature, NotFound

KEY_PREFIX = "sk_"
_VISIBLE = len(KEY_PREFIX) + 8
# Writing last_used_at on every request would turn each read into a write.
_LAST_USED_RESOLUTION_MS = 60_000


@dataclass(frozen=True)
class CreatedKey:
    id: str
    prefix: str
    api_key: str
    signing_secret: str | None


@dataclass(frozen=True)
class AuthenticatedKey:
    id: str
    prefix: str
    signing_secret: str | None
    require_signature: bool
    account: Account


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


async def create(
    db: Database,
    box: SecretBox,
    account_id: str,
    *,
    name: str = "default",
    signing: bool = False,
    require_signature: bool = False,
) -> CreatedKey:
    api_key = KEY_PREFIX + secrets.token_urlsafe(32)
    signing_secret = "ss_" + secrets.token_urlsafe(32) if signing or require_signature else None
    key_id = new_id()
    async with db.begin() as conn:
        exists = await conn.scalar(sa.select(accounts.c.id).where(accounts.c.id == account_id))
        if exists is None:
            raise NotFound("Account not found")
        await conn.execute(
            api_keys.insert().values(
                id=key_id,
                account_id=account_id,
                name=name,
                prefix=api_key[:_VISIBLE],
                key_hash=hash_key(api_key),
                signing_secret=box.encrypt(signing_secret) if signing_secret else None,
                require_signature=require_signature,
                created_at=now_ms(),
            )
        )
    return CreatedKey(key_id, api_key[:_VISIBLE], api_key, signing_secret)


async def revoke(db: Database, prefix: str, *, account_id: str | None = None) -> None:
    query = api_keys.update().where(api_keys.c.prefix == prefix, api_keys.c.revoked_at.is_(None))
    if account_id is not None:
        query = query.where(api_keys.c.account_id == account_id)
    async with db.begin() as conn:
        if (await conn.execute(query.values(revoked_at=now_ms()))).rowcount == 0:
            raise NotFound("API key not found")


async def list_for_account(conn: AsyncConnection, account_id: str) -> list[Any]:
    query = (
        sa.select(
            api_keys.c.id,
            api_keys.c.name,
            api_keys.c.prefix,
            api_keys.c.created_at,
            api_keys.c.last_used_at,
            api_keys.c.revoked_at,
            api_keys.c.require_signature,
            api_keys.c.signing_secret.is_not(None).label("signing"),
        )
        .where(api_keys.c.account_id == account_id)
        .order_by(api_keys.c.created_at.desc())
    )
    return list((await conn.execute(query)).all())


_ACCOUNT_FIELDS = (
    "id",
    "name",
    "active",
    "rate_per_second",
    "daily_limit",
    "max_message_size",
    "expires_on",
)
_ACCOUNT_COLUMNS = [accounts.c[f].label("account_" + f) for f in _ACCOUNT_FIELDS]


async def authenticate(db: Database, box: SecretBox, token: str) -> AuthenticatedKey:
    """The key behind a bearer token, with its account; unknown or revoked: 100029."""
    if not token.startswith(KEY_PREFIX) or len(token) > 200:
        raise InvalidSignature()
    digest = hash_key(token)
    return await db.cache.get_or_load(("key", digest), lambda: _lookup_key(db, box, digest))


async def _lookup_key(db: Database, box: SecretBox, digest: str) -> AuthenticatedKey:
    query = (
        sa.select(
            api_keys.c.id,
            api_keys.c.prefix,
            api_keys.c.key_hash,
            api_keys.c.signing_secret,
            api_keys.c.require_signature,
            api_keys.c.last_used_at,
            api_keys.c.revoked_at,
            *_ACCOUNT_COLUMNS,
        )
        .join(accounts, accounts.c.id == api_keys.c.account_id)
        .where(api_keys.c.key_hash == digest)
    )
    async with db.read() as conn:
        row = (await conn.execute(query)).first()
    # The lookup is by hash; the comparison still runs in constant time for good measure.
    if row is None or not hmac.compare_digest(row.key_hash, digest) or row.revoked_at:
        raise InvalidSignature()
    if row.last_used_at is None or now_ms() - row.last_used_at > _LAST_USED_RESOLUTION_MS:
        await _touch(db, row.id)
    account = Account(**{f: getattr(row, "account_" + f) for f in _ACCOUNT_FIELDS})
    secret = box.decrypt(row.signing_secret) if row.signing_secret else None
    return AuthenticatedKey(row.id, row.prefix, secret, row.require_signature, account)


async def _touch(db: Database, key_id: str) -> None:
    async def touch(conn: AsyncConnection) -> None:
        await conn.execute(
            api_keys.update().where(api_keys.c.id == key_id).values(last_used_at=now_ms())
        )

    await db.write(touch)


# --- request signatures ---------------------------------------------------------------


def string_to_sign(timestamp: str, method: str, path_with_query: str, body: bytes) -> bytes:
    body_hash = hashlib.sha256(body).hexdigest()
    return f"{timestamp}\n{method.upper()}\n{path_with_query}\n{body_hash}".encode()


def sign_request(
    secret: str, timestamp: str, method: str, path_with_query: str, body: bytes
) -> str:
    """What a client puts in `X-SendKit-Signature`."""
    payload = string_to_sign(timestamp, method, path_with_query, body)
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


class ReplayGuard(Protocol):
    async def first_seen(self, signature: str, ttl: int) -> bool:
        """True the first time a signature is offered within `ttl` seconds."""
        ...


class MemoryReplayGuard:
    def __init__(self) -> None:
        self._seen: dict[str, float] = {}

    async def first_seen(self, signature: str, ttl: int) -> bool:
        now = time.monotonic()
        if len(self._seen) > 10_000:
            self._seen = {s: t for s, t in self._seen.items() if t > now}
        expiry = self._seen.get(signature)
        if expiry is not None and expiry > now:
            return False
        self._seen[signature] = now + ttl
        return True


class RedisReplayGuard:
    def __init__(self, client: Any) -> None:
        self._client = client

    async def first_seen(self, signature: str, ttl: int) -> bool:
        return bool(await self._client.set(f"sendkit:sig:{signature}", 1, nx=True, ex=ttl))


def precheck_signature(
    key: AuthenticatedKey,
    *,
    timestamp: str | None,
    signature: str | None,
    window: int,
    now: float | None = None,
) -> bool:
    """The part of check 1 that needs no body; True when the request is to be verified.

    Runs before the body is read, so a request that can never pass answers 100029 even
    when its body is also too large.
    """
    if timestamp is None and signature is None:
        if key.require_signature:
            raise InvalidSignature("Invalid signature: this API key requires signed requests")
        return False
    if not key.signing_secret or not timestamp or not signature:
        raise InvalidSignature()
    try:
        skew = abs((time.time() if now is None else now) - int(timestamp))
    except ValueError:
        raise InvalidSignature() from None
    if skew > window:
        raise InvalidSignature("Invalid signature: timestamp outside the allowed window")
    return True


async def verify_signature(
    key: AuthenticatedKey,
    *,
    timestamp: str | None,
    signature: str | None,
    method: str,
    path_with_query: str,
    body: bytes,
    window: int,
    guard: ReplayGuard,
    now: float | None = None,
) -> None:
    """Check 1 of the documented order for signed requests; every failure is 100029."""
    signed = precheck_signature(
        key, timestamp=timestamp, signature=signature, window=window, now=now
    )
    if not signed or timestamp is None or signature is None or key.signing_secret is None:
        return
    expected = sign_request(key.signing_secret, timestamp, method, path_with_query, body)
    if not hmac.compare_digest(expected, signature.strip().lower()):
        raise InvalidSignature()
    if not await guard.first_seen(expected, 2 * window):
        raise InvalidSignature("Invalid signature: this signature was already used")
