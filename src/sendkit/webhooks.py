"""Webhook endpoints, Standard Webhooks signing, and the delivery worker.

Each account may register endpoints (URL, event types, enabled). `events.record()` puts one
`webhook_deliveries` row per matching endpoint in the same transaction as the event; the
worker here claims due rows under a lease (like `delivery/queue.py`), POSTs them, logs
every attempt in `webhook_attempts`, and decides with `WEBHOOK_POLICY`:

    2xx                                   delivered
    timeout, connection error, 429, 5xx   retried (5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h)
    410 Gone                              failed, and the endpoint is disabled
    3xx (never followed), other 4xx       failed
    internal address (see netguard)       failed

Signing (https://www.standardwebhooks.com): the secret is `whsec_` + base64(24 random
bytes); `webhook-signature` is `v1,` + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}"))
where the key is the base64-decoded part after `whsec_`. `webhook-id` names the event
(`evt_<id>`), so retries and replays of one event carry the same id and receivers can
deduplicate.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import random
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import httpx
import sqlalchemy as sa
from cryptography.fernet import InvalidToken
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.ext.asyncio import AsyncConnection

from sendkit import __version__, logs, netguard
from sendkit.accounts import new_id
from sendkit.config import Settings
from sendkit.crypto import SecretBox
from sendkit.db import (
    Database,
    now_ms,
    webhook_attempts,
    webhook_deliveries,
    webhook_endpoints,
)
from sendkit.delivery.retry import WEBHOOK_POLICY, RetryPolicy, next_attempt_at
from sendkit.errors import BadRequest, NotFound
from sendkit.events import ALL_TYPES, ANY, iso
from sendkit.services import Services

log = logs.get("sendkit.webhooks")

SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)
MAX_ENDPOINTS = 20
_EXCERPT_BYTES = 1024
_LEASE_MARGIN_SECONDS = 60


# --- signing ------------------------------------------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one request."""
    to_sign = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), to_sign, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def message_id(event_id: int) -> str:
    return f"evt_{event_id}"


def signed_headers(secret: str, msg_id: str, body: bytes, timestamp: int) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }


# --- endpoints ----------------------------------------------------------------------------


def _events_spec(value: Any) -> str:
    """`*`, a list of event types, or a comma-separated string of them, stored canonically."""
    if value is None or value == ANY or value == [ANY]:
        return ANY
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError("must be '*' or a non-empty list of event types")
    wanted: list[str] = []
    for item in items:
        name = str(item).strip()
        if name not in ALL_TYPES:
            raise ValueError(f"has an unknown event type {name!r} (known: {', '.join(ALL_TYPES)})")
        if name not in wanted:
            wanted.append(name)
    return ",".join(t for t in ALL_TYPES if t in wanted)


class CreateWebhook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=8, max_length=2000)
    events: str = ANY
    enabled: bool = True

    @field_validator("events", mode="before")
    @classmethod
    def _events(cls, value: Any) -> str:
        return _events_spec(value)


class UpdateWebhook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, min_length=8, max_length=2000)
    events: str | None = None
    enabled: bool | None = None

    @field_validator("events", mode="before")
    @classmethod
    def _events(cls, value: Any) -> str | None:
        return None if value is None else _events_spec(value)


class DeliveryQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: Literal["pending", "sending", "delivered", "failed"] | None = None
    before: int | None = Field(default=None, ge=1)  # the `createdAt` of the last one seen
    limit: int = Field(default=50, ge=1, le=500)


def allowed_networks(settings: Settings) -> tuple[netguard.IPNetwork, ...]:
    return netguard.parse_networks(settings.webhook_allow_cidrs)


async def _check_url(url: str, settings: Settings) -> str:
    url = url.strip()
    if any(c in url for c in "\r\n\t "):
        raise BadRequest("Bad request parameters: 'url' must not contain whitespace")
    try:
        await netguard.check_url(url, allowed_networks(settings))
    except ValueError as exc:
        raise BadRequest(f"Bad request parameters: 'url' {exc}") from None
    return url


def endpoint_to_api(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "url": row.url,
        "events": ["*"] if row.events == ANY else row.events.split(","),
        "enabled": bool(row.enabled),
        "disabledReason": row.disabled_reason,
        "createdAt": row.created_at,
    }


_ENDPOINT_COLUMNS = [c for c in webhook_endpoints.c if c.name != "secret"]


async def create_endpoint(
    db: Database, box: SecretBox, settings: Settings, account_id: str, request: CreateWebhook
) -> dict[str, Any]:
    """A new endpoint; its signing secret is in this answer only."""
    url = await _check_url(request.url, settings)
    secret = new_secret()
    endpoint_id = new_id()
    async with db.begin() as conn:
        count = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(webhook_endpoints)
            .where(webhook_endpoints.c.account_id == account_id)
        )
        if (count or 0) >= MAX_ENDPOINTS:
            raise BadRequest(f"Bad request parameters: at most {MAX_ENDPOINTS} webhook endpoints")
        await conn.execute(
            webhook_endpoints.insert().values(
                id=endpoint_id,
                account_id=account_id,
                url=url,
                secret=box.encrypt(secret),
                events=request.events,
                enabled=request.enabled,
                created_at=now_ms(),
            )
        )
        created = await _endpoint_row(conn, account_id, endpoint_id)
    return endpoint_to_api(created) | {"secret": secret}


async def _endpoint_row(conn: AsyncConnection, account_id: str, endpoint_id: str) -> Any:
    row = (
        await conn.execute(
            sa.select(*_ENDPOINT_COLUMNS).where(
                webhook_endpoints.c.id == endpoint_id,
                webhook_endpoints.c.account_id == account_id,
            )
        )
    ).first()
    if row is None:
        raise NotFound("Bad request parameters: webhook endpoint not found")
    return row


async def list_endpoints(db: Database, account_id: str) -> list[dict[str, Any]]:
    async with db.read() as conn:
        rows = await conn.execute(
            sa.select(*_ENDPOINT_COLUMNS)
            .where(webhook_endpoints.c.account_id == account_id)
            .order_by(webhook_endpoints.c.created_at)
        )
        return [endpoint_to_api(r) for r in rows]


async def get_endpoint(db: Database, account_id: str, endpoint_id: str) -> dict[str, Any]:
    async with db.read() as conn:
        return endpoint_to_api(await _endpoint_row(conn, account_id, endpoint_id))


async def update_endpoint(
    db: Database, settings: Settings, account_id: str, endpoint_id: str, request: UpdateWebhook
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if request.url is not None:
        values["url"] = await _check_url(request.url, settings)
    if request.events is not None:
        values["events"] = request.events
    if request.enabled is not None:
        values["enabled"] = request.enabled
        values["disabled_reason"] = None if request.enabled else "disabled by the account"
    async with db.begin() as conn:
        await _endpoint_row(conn, account_id, endpoint_id)
        if values:
            await conn.execute(
                webhook_endpoints.update()
                .where(webhook_endpoints.c.id == endpoint_id)
                .values(**values)
            )
        return endpoint_to_api(await _endpoint_row(conn, account_id, endpoint_id))


async def rotate_secret(db: Database, box: SecretBox, account_id: str, endpoint_id: str) -> str:
    """A new secret, effective for the next attempt; shown once."""
    secret = new_secret()
    async with db.begin() as conn:
        await _endpoint_row(conn, account_id, endpoint_id)
        await conn.execute(
            webhook_endpoints.update()
            .where(webhook_endpoints.c.id == endpoint_id)
            .values(secret=box.encrypt(secret))
        )
    return secret


async def delete_endpoint(db: Database, account_id: str, endpoint_id: str) -> None:
    async with db.begin() as conn:
        result = await conn.execute(
            webhook_endpoints.delete().where(
                webhook_endpoints.c.id == endpoint_id,
                webhook_endpoints.c.account_id == account_id,
            )
        )
    if result.rowcount == 0:
        raise NotFound("Bad request parameters: webhook endpoint not found")


# --- the delivery log and replay ----------------------------------------------------------


def delivery_to_api(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "endpointId": row.endpoint_id,
        "eventId": row.event_id,
        "webhookId": message_id(row.event_id),
        "status": row.status,
        "attempts": row.attempts,
        "nextAttemptAt": row.next_attempt_at if row.status in ("pending", "sending") else None,
        "lastStatusCode": row.last_status_code,
        "lastError": row.last_error,
        "createdAt": row.created_at,
        "updatedAt": row.updated_at,
    }


def attempt_to_api(row: Any) -> dict[str, Any]:
    return {
        "startedAt": row.started_at,
        "durationMs": row.duration_ms,
        "statusCode": row.status_code,
        "error": row.error,
        "response": row.response_excerpt,
    }


async def list_deliveries(
    db: Database, account_id: str, endpoint_id: str, query: DeliveryQuery | None = None
) -> list[dict[str, Any]]:
    """Newest first, each with its attempts (the dashboard's delivery log)."""
    query = query or DeliveryQuery()
    select = sa.select(webhook_deliveries).where(webhook_deliveries.c.endpoint_id == endpoint_id)
    if query.status is not None:
        select = select.where(webhook_deliveries.c.status == query.status)
    if query.before is not None:
        select = select.where(webhook_deliveries.c.created_at < query.before)
    select = select.order_by(webhook_deliveries.c.created_at.desc(), webhook_deliveries.c.id)
    async with db.read() as conn:
        await _endpoint_row(conn, account_id, endpoint_id)
        rows = (await conn.execute(select.limit(query.limit))).all()
        by_delivery = await _attempts_of(conn, [r.id for r in rows])
    return [delivery_to_api(r) | {"attemptLog": by_delivery.get(r.id, [])} for r in rows]


async def _attempts_of(
    conn: AsyncConnection, delivery_ids: Sequence[str]
) -> dict[str, list[dict[str, Any]]]:
    if not delivery_ids:
        return {}
    rows = await conn.execute(
        sa.select(webhook_attempts)
        .where(webhook_attempts.c.delivery_id.in_(delivery_ids))
        .order_by(webhook_attempts.c.id)
    )
    found: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        found.setdefault(row.delivery_id, []).append(attempt_to_api(row))
    return found


async def get_delivery(
    db: Database, account_id: str, endpoint_id: str, delivery_id: str
) -> dict[str, Any]:
    """One delivery with its payload and every attempt."""
    async with db.read() as conn:
        row = (
            await conn.execute(
                sa.select(webhook_deliveries)
                .join(webhook_endpoints, webhook_endpoints.c.id == webhook_deliveries.c.endpoint_id)
                .where(
                    webhook_deliveries.c.id == delivery_id,
                    webhook_deliveries.c.endpoint_id == endpoint_id,
                    webhook_endpoints.c.account_id == account_id,
                )
            )
        ).first()
        if row is None:
            raise NotFound("Bad request parameters: webhook delivery not found")
        attempts = await _attempts_of(conn, [row.id])
    return delivery_to_api(row) | {"payload": row.payload, "attemptLog": attempts.get(row.id, [])}


async def replay(db: Database, account_id: str, endpoint_id: str, delivery_id: str) -> str:
    """Send an earlier delivery again, as a new delivery with a fresh retry schedule; the
    old one and its attempts stay in the log. Same `webhook-id`: it is the same event."""
    now = now_ms()
    new_delivery = new_id()
    async with db.begin() as conn:
        endpoint = await _endpoint_row(conn, account_id, endpoint_id)
        row = (
            await conn.execute(
                sa.select(webhook_deliveries.c.event_id, webhook_deliveries.c.payload).where(
                    webhook_deliveries.c.id == delivery_id,
                    webhook_deliveries.c.endpoint_id == endpoint_id,
                )
            )
        ).first()
        if row is None:
            raise NotFound("Bad request parameters: webhook delivery not found")
        if not endpoint.enabled:
            raise BadRequest("Bad request parameters: the endpoint is disabled; enable it first")
        await conn.execute(
            webhook_deliveries.insert().values(
                id=new_delivery,
                endpoint_id=endpoint_id,
                event_id=row.event_id,
                payload=row.payload,
                status="pending",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
                updated_at=now,
            )
        )
    return new_delivery


# --- one attempt, as a value --------------------------------------------------------------


class Verdict(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    FAILED = "failed"
    GONE = "gone"  # 410: the receiver asks us to stop


@dataclass(frozen=True)
class Attempt:
    started_at: int
    duration_ms: int
    status_code: int | None = None
    error: str | None = None
    response_excerpt: str | None = None
    blocked: bool = False


def classify(attempt: Attempt) -> Verdict:
    code = attempt.status_code
    if attempt.blocked:
        return Verdict.FAILED
    if code is None or code == 429 or code >= 500:
        return Verdict.RETRY
    if 200 <= code < 300:
        return Verdict.DELIVERED
    if code == 410:
        return Verdict.GONE
    return Verdict.FAILED  # 1xx, 3xx (redirects are not followed), other 4xx


async def post(
    client: httpx.AsyncClient, url: str, secret: str, msg_id: str, body: bytes, limit_s: float
) -> Attempt:
    """One signed POST; every outcome, failures included, comes back as an Attempt."""
    started = now_ms()
    clock = time.perf_counter()
    headers = signed_headers(secret, msg_id, body, int(time.time()))

    def done(**fields: Any) -> Attempt:
        return Attempt(started, int((time.perf_counter() - clock) * 1000), **fields)

    try:
        # The client's own timeouts are per phase; this bounds the whole exchange, so a
        # receiver that drips its answer cannot hold a worker slot.
        async with asyncio.timeout(limit_s):
            async with client.stream("POST", url, content=body, headers=headers) as response:
                excerpt = await _excerpt(response)
        return done(status_code=response.status_code, response_excerpt=excerpt)
    except (TimeoutError, httpx.TimeoutException):
        return done(error=f"timeout after {limit_s:g} s")
    except httpx.HTTPError as exc:
        reason = netguard.blocked_reason(exc)
        if reason is not None:
            return done(error=f"blocked: {reason}", blocked=True)
        return done(error=f"{type(exc).__name__}: {exc}"[:500])


async def _excerpt(response: httpx.Response) -> str:
    taken = b""
    async for chunk in response.aiter_raw():
        taken += chunk
        if len(taken) >= _EXCERPT_BYTES:
            break
    return taken[:_EXCERPT_BYTES].decode("utf-8", "replace")


# --- the queue ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    id: str
    endpoint_id: str
    event_id: int
    payload: str
    attempts: int
    created_at: int
    lease_token: str
    url: str
    secret: str  # encrypted
    enabled: bool


_CLAIM_COLUMNS = [
    webhook_deliveries.c.id,
    webhook_deliveries.c.endpoint_id,
    webhook_deliveries.c.event_id,
    webhook_deliveries.c.payload,
    webhook_deliveries.c.attempts,
    webhook_deliveries.c.created_at,
    webhook_deliveries.c.lease_token,
]


async def claim(db: Database, limit: int, lease_ms: int) -> list[Claimed]:
    """Due deliveries, leased as in the message queue: `sending` with `next_attempt_at` at
    the lease's end, so a crashed worker's deliveries become due again by themselves."""
    now = now_ms()
    token = secrets.token_hex(16)
    due = (
        sa.select(webhook_deliveries.c.id)
        .where(
            webhook_deliveries.c.status.in_(("pending", "sending")),
            webhook_deliveries.c.next_attempt_at <= now,
        )
        .order_by(webhook_deliveries.c.next_attempt_at)
        .limit(limit)
    )
    if not db.is_sqlite:
        due = due.with_for_update(skip_locked=True)
    query = (
        webhook_deliveries.update()
        .where(webhook_deliveries.c.id.in_(due.scalar_subquery()))
        .values(status="sending", lease_token=token, next_attempt_at=now + lease_ms, updated_at=now)
        .returning(*_CLAIM_COLUMNS)
    )
    async with db.begin(invalidates=False) as conn:
        rows = (await conn.execute(query)).all()
        if not rows:
            return []
        endpoints = {
            e.id: e
            for e in await conn.execute(
                sa.select(
                    webhook_endpoints.c.id,
                    webhook_endpoints.c.url,
                    webhook_endpoints.c.secret,
                    webhook_endpoints.c.enabled,
                ).where(webhook_endpoints.c.id.in_({r.endpoint_id for r in rows}))
            )
        }
    claimed = []
    for row in rows:
        endpoint = endpoints[row.endpoint_id]  # the FK cascades: it exists
        claimed.append(
            Claimed(
                **row._mapping,
                url=endpoint.url,
                secret=endpoint.secret,
                enabled=bool(endpoint.enabled),
            )
        )
    return claimed


async def finish(
    db: Database,
    delivery: Claimed,
    attempt: Attempt | None,
    status: str,
    next_at: int | None,
    *,
    gone: bool = False,
    note: str | None = None,
) -> bool:
    """Record one outcome, fenced by the lease token; False when the lease was lost."""
    now = now_ms()
    async with db.begin(invalidates=False) as conn:
        if attempt is not None:
            await conn.execute(
                webhook_attempts.insert().values(
                    delivery_id=delivery.id,
                    started_at=attempt.started_at,
                    duration_ms=attempt.duration_ms,
                    status_code=attempt.status_code,
                    error=attempt.error,
                    response_excerpt=attempt.response_excerpt,
                )
            )
        result = await conn.execute(
            webhook_deliveries.update()
            .where(
                webhook_deliveries.c.id == delivery.id,
                webhook_deliveries.c.lease_token == delivery.lease_token,
            )
            .values(
                status=status,
                attempts=webhook_deliveries.c.attempts + (1 if attempt is not None else 0),
                next_attempt_at=next_at,
                lease_token=None,
                last_status_code=attempt.status_code if attempt else None,
                last_error=(attempt.error if attempt else note),
                updated_at=now,
            )
        )
        if gone:
            await conn.execute(
                webhook_endpoints.update()
                .where(webhook_endpoints.c.id == delivery.endpoint_id)
                .values(enabled=False, disabled_reason=f"410 Gone at {iso(now)}")
            )
    return bool(result.rowcount)


# --- the worker ---------------------------------------------------------------------------


def retry_policy(settings: Settings) -> RetryPolicy:
    if settings.webhook_retry_schedule:
        return RetryPolicy.parse(settings.webhook_retry_schedule)
    return WEBHOOK_POLICY


def make_client(settings: Settings) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=netguard.GuardedTransport(allowed_networks(settings)),
        follow_redirects=False,
        timeout=httpx.Timeout(settings.webhook_timeout),
        trust_env=False,
        headers={"user-agent": f"SendKit-Webhooks/{__version__}"},
    )


class WebhookWorker:
    """Claim -> POST -> decide -> record, for webhook deliveries; runs beside the delivery
    worker in `sendkit serve` and `sendkit worker`."""

    def __init__(
        self,
        services: Services,
        *,
        client: httpx.AsyncClient | None = None,
        rng: random.Random | None = None,
    ) -> None:
        settings: Settings = services.settings
        self.services = services
        self.settings = settings
        self.policy = retry_policy(settings)
        self.client = client or make_client(settings)
        self.concurrency = settings.webhook_concurrency
        self.lease_ms = int((settings.webhook_timeout + _LEASE_MARGIN_SECONDS) * 1000)
        self.wakeup = asyncio.Event()
        self._rng = rng or random.Random()
        self._inflight: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self._fill(stop)
        finally:
            await self._drain()

    async def close(self) -> None:
        await self.client.aclose()

    async def _fill(self, stop: asyncio.Event) -> None:
        capacity = self.concurrency - len(self._inflight)
        if capacity <= 0:
            await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
            return
        try:
            claimed = await claim(self.services.db, capacity, self.lease_ms)
        except Exception:
            log.exception("webhook_claim_failed")
            claimed = []
        for delivery in claimed:
            task = asyncio.create_task(self._process(delivery))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        if not claimed:
            await self._sleep(stop)

    async def _sleep(self, stop: asyncio.Event) -> None:
        self.wakeup.clear()
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(self.wakeup.wait())]
        await asyncio.wait(
            waiters, timeout=self.settings.poll_interval, return_when="FIRST_COMPLETED"
        )
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)

    async def _drain(self) -> None:
        # Unfinished deliveries keep their lease and are retried when it runs out: at least
        # once, never lost.
        if self._inflight:
            _, late = await asyncio.wait(self._inflight, timeout=self.settings.shutdown_timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _process(self, delivery: Claimed) -> None:
        try:
            await self.deliver(delivery)
        except Exception:
            log.exception("webhook_step_failed", delivery_id=delivery.id)

    async def deliver(self, delivery: Claimed) -> Verdict:
        db = self.services.db
        if not delivery.enabled:
            await finish(db, delivery, None, "failed", None, note="endpoint disabled")
            return Verdict.FAILED
        try:
            secret = self.services.box.decrypt(delivery.secret)
        except InvalidToken:
            # Retrying cannot help: the server's secret key changed since the endpoint was made.
            note = "the endpoint's secret cannot be decrypted: rotate it"
            await finish(db, delivery, None, "failed", None, note=note)
            return Verdict.FAILED
        attempt = await post(
            self.client,
            delivery.url,
            secret,
            message_id(delivery.event_id),
            delivery.payload.encode(),
            self.settings.webhook_timeout,
        )
        verdict = classify(attempt)
        status, next_at = self.decide(delivery, verdict)
        await finish(db, delivery, attempt, status, next_at, gone=verdict is Verdict.GONE)
        self.services.metrics.webhook_deliveries.labels(status).inc()
        log.info(
            "webhook_attempt",
            delivery_id=delivery.id,
            endpoint_id=delivery.endpoint_id,
            status_code=attempt.status_code,
            error=attempt.error,
            verdict=verdict.value,
            status=status,
            attempt=delivery.attempts + 1,
            duration_ms=attempt.duration_ms,
        )
        return verdict

    def decide(self, delivery: Claimed, verdict: Verdict) -> tuple[str, int | None]:
        if verdict is Verdict.DELIVERED:
            return "delivered", None
        if verdict is not Verdict.RETRY:
            return "failed", None
        first = dt.datetime.fromtimestamp(delivery.created_at / 1000, dt.UTC)
        when = next_attempt_at(
            self.policy, delivery.attempts + 1, first, dt.datetime.now(dt.UTC), self._rng
        )
        if when is None:
            return "failed", None
        return "pending", int(when.timestamp() * 1000)
