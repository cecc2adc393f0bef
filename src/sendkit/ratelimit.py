"""Per-account request limits: a moving one-second window, in memory or in Redis (shared)."""

from __future__ import annotations

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


# One moving window per account in one round trip: trim what left the window, count,
# take a slot if there is one, and answer (allowed, count, oldest entry). The list holds
# the timestamps of accepted requests, newest first.
_MOVING_WINDOW = """
local key, now, limit, expiry = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
while true do
  local last = redis.call('LINDEX', key, -1)
  if not last or tonumber(last) > now - expiry then break end
  redis.call('RPOP', key)
end
local count = redis.call('LLEN', key)
local allowed = 0
if count < limit then
  redis.call('LPUSH', key, ARGV[1])
  count = count + 1
  allowed = 1
end
redis.call('EXPIRE', key, expiry + 1)
return {allowed, count, redis.call('LINDEX', key, -1) or ARGV[1]}
"""


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
        self._script = redis.register_script(_MOVING_WINDOW) if redis is not None else None
        self._windows: dict[str, deque[float]] = {}

    async def hit(self, account_id: str, per_second: int) -> RateState:
        """Count one request; over the limit raises 100025 carrying the headers."""
        now = time.time()
        if self._script is not None:
            reply = await self._script(
                keys=[f"sendkit:rate:{account_id}"], args=[now, per_second, 1]
            )
            allowed, count, oldest = bool(reply[0]), int(reply[1]), float(reply[2])
        else:
            allowed, count, oldest = self._hit_here(account_id, per_second, now)
        state = RateState(per_second, max(0, per_second - count), math.ceil(oldest + 1))
        if not allowed:
            retry_after = max(1, math.ceil(oldest + 1 - now))
            raise RateLimited(headers=state.headers() | {"Retry-After": str(retry_after)})
        return state

    def _hit_here(self, account_id: str, per_second: int, now: float) -> tuple[bool, int, float]:
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
