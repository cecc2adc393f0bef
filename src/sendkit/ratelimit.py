"""Per-account request limits over the `limits` package (memory, or Redis when shared)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

from sendkit.errors import RateLimited


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


class RateLimiter:
    def __init__(self, redis_url: str | None = None) -> None:
        self.storage: Storage
        if redis_url:
            uri = "async+" + redis_url if not redis_url.startswith("async+") else redis_url
            self.storage = RedisStorage(uri, implementation="redispy")
        else:
            self.storage = MemoryStorage()
        self._limiter = MovingWindowRateLimiter(self.storage)

    async def hit(self, account_id: str, per_second: int) -> RateState:
        """Count one request; over the limit raises 100025 carrying the headers."""
        item = RateLimitItemPerSecond(per_second)
        allowed = await self._limiter.hit(item, "account", account_id)
        stats = await self._limiter.get_window_stats(item, "account", account_id)
        state = RateState(per_second, max(0, stats.remaining), math.ceil(stats.reset_time))
        if not allowed:
            retry_after = max(1, math.ceil(stats.reset_time - time.time()))
            headers = state.headers() | {"Retry-After": str(retry_after)}
            raise RateLimited(headers=headers)
        return state

    async def close(self) -> None:
        """The Redis storage opens its own client; nothing else would close it."""
        if isinstance(self.storage, RedisStorage):
            client = getattr(getattr(self.storage, "bridge", None), "storage", None)
            if client is not None:
                await client.aclose()

    async def reset(self) -> None:
        await self.storage.reset()
