"""Per-account request limits: a moving one-second window, in memory or in Redis (shared)."""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from limits.aio.storage import MemoryStorage, RedisStorage, Storage

from sendkit.errors import RateLimited

_MAX_WINDOWS = 10_000  # accounts seen recently; idle ones are dropped past this


@dataclass(frozen=True)
class RateState:
    limit: int
    remaining: int
    reset: int  # unix seconds when a slot frees up

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset),
        }


# Moving windows, one per account, for several hits in one round trip. For each hit in
# order (KEYS[i]; ARGV: now, limit per hit, then the window's length): trim what left
# the window, count, take a slot if there is one, and answer (allowed, count, oldest
# entry). A list holds the timestamps of accepted requests, newest first.
_MOVING_WINDOWS = """
local expiry = tonumber(ARGV[#ARGV])
local replies = {}
for i, key in ipairs(KEYS) do
  local stamp = ARGV[2 * i - 1]
  local now, limit = tonumber(stamp), tonumber(ARGV[2 * i])
  while true do
    local last = redis.call('LINDEX', key, -1)
    if not last or tonumber(last) > now - expiry then break end
    redis.call('RPOP', key)
  end
  local count = redis.call('LLEN', key)
  local allowed = 0
  if count < limit then
    redis.call('LPUSH', key, stamp)
    count = count + 1
    allowed = 1
  end
  redis.call('EXPIRE', key, expiry + 1)
  table.insert(replies, allowed)
  table.insert(replies, count)
  table.insert(replies, redis.call('LINDEX', key, -1) or stamp)
end
return replies
"""

Hit = tuple[bool, int, float]  # allowed, requests in the window, the oldest one's time
_Waiting = tuple[str, int, float, "asyncio.Future[Hit]"]  # a hit and its caller


class _SharedWindows:
    """The hits of this process go to Redis together: one script call for every hit
    that arrived while the previous call was out, each counted in order as if alone.
    A call per request cost the API about as much CPU as the rest of a send."""

    def __init__(self, script: Any) -> None:
        self._script = script
        self._pending: list[_Waiting] = []
        self._sender: asyncio.Task[None] | None = None

    async def hit(self, account_id: str, per_second: int, now: float) -> Hit:
        future: asyncio.Future[Hit] = asyncio.get_running_loop().create_future()
        self._pending.append((account_id, per_second, now, future))
        if self._sender is None or self._sender.done():
            # A fresh context: the sender serves every request, not the one that started it.
            self._sender = asyncio.create_task(self._send_all(), context=contextvars.Context())
        return await future

    async def _send_all(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                reply = await self._script(
                    keys=[f"sendkit:rate:{account_id}" for account_id, _, _, _ in batch],
                    args=[v for _, limit, now, _ in batch for v in (now, limit)] + [1],
                )
                for i, (*_, future) in enumerate(batch):
                    if not future.done():
                        allowed, count, oldest = reply[3 * i : 3 * i + 3]
                        future.set_result((bool(allowed), int(count), float(oldest)))
            except Exception as exc:  # every waiting caller hears it, as it would alone
                _settle(batch, exc)
            except BaseException:  # cancelled (shutdown): nobody is left waiting
                _settle(batch + self._pending, None)
                self._pending = []
                raise


def _settle(batch: list[_Waiting], error: Exception | None) -> None:
    """The batch's callers still waiting: the error, or cancelled with the sender."""
    for *_, future in batch:
        if future.done():
            continue
        if error is None:
            future.cancel()
        else:
            future.set_exception(error)


class RateLimiter:
    """Requests per second per account over a moving one-second window: in this process,
    or in Redis when several processes share the budget.

    `storage` (the `limits` package's) serves the dashboard's per-minute throttles; the
    API's window is ours, since the package needs two storage calls (two Redis scripts)
    per request where one does."""

    def __init__(self, redis_url: str | None = None, *, redis: Any = None) -> None:
        self.storage: Storage
        if redis_url:
            uri = "async+" + redis_url if not redis_url.startswith("async+") else redis_url
            self.storage = RedisStorage(uri, implementation="redispy")
        else:
            self.storage = MemoryStorage()
        self._own_redis: Any = None
        if redis is None and redis_url:
            import redis.asyncio as aioredis

            redis = self._own_redis = aioredis.from_url(redis_url)
        self._shared = (
            _SharedWindows(redis.register_script(_MOVING_WINDOWS)) if redis is not None else None
        )
        self._windows: dict[str, deque[float]] = {}

    async def hit(self, account_id: str, per_second: int) -> RateState:
        """Count one request; over the limit raises 100025 carrying the headers."""
        now = time.time()
        if self._shared is not None:
            allowed, count, oldest = await self._shared.hit(account_id, per_second, now)
        else:
            allowed, count, oldest = self._hit_here(account_id, per_second, now)
        state = RateState(per_second, max(0, per_second - count), math.ceil(oldest + 1))
        if not allowed:
            retry_after = max(1, math.ceil(oldest + 1 - now))
            raise RateLimited(headers=state.headers() | {"Retry-After": str(retry_after)})
        return state

    def _hit_here(self, account_id: str, per_second: int, now: float) -> Hit:
        window = self._windows.get(account_id)
        if window is None:
            if len(self._windows) > _MAX_WINDOWS:
                self._forget_idle(now)
            window = self._windows[account_id] = deque()
        while window and window[0] <= now - 1:
            window.popleft()
        allowed = len(window) < per_second
        if allowed:
            window.append(now)
        return allowed, len(window), window[0] if window else now

    def _forget_idle(self, now: float) -> None:
        for account_id in [a for a, w in self._windows.items() if not w or w[-1] <= now - 1]:
            del self._windows[account_id]

    async def close(self) -> None:
        """The Redis storage opens its own client; nothing else would close it."""
        if isinstance(self.storage, RedisStorage):
            client = getattr(getattr(self.storage, "bridge", None), "storage", None)
            if client is not None:
                await client.aclose()
        if self._own_redis is not None:
            await self._own_redis.aclose()

    async def reset(self) -> None:
        await self.storage.reset()
        self._windows.clear()
