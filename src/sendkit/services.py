"""The long-lived objects one process shares: built once from Settings, closed once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from sendkit.config import Settings
from sendkit.crypto import SecretBox
from sendkit.db import Database
from sendkit.keys import MemoryReplayGuard, RedisReplayGuard, ReplayGuard
from sendkit.metrics import Metrics
from sendkit.ratelimit import RateLimiter
from sendkit.wakeups import WakeSender, directory


@dataclass
class Services:
    settings: Settings
    db: Database
    box: SecretBox
    limiter: RateLimiter
    replay_guard: ReplayGuard
    redis: Any = None
    wakes: WakeSender | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    # One registry per Services: tests build many in one process without collisions.
    metrics: Metrics = field(default_factory=Metrics)

    def notify_queued(self) -> None:
        """Wake a worker at once instead of at its next poll: the one in this process, or
        else the delivery processes of this machine (`wakeups`)."""
        worker = self.extras.get("worker")
        if worker is not None:
            worker.wakeup.set()
        elif self.wakes is not None:
            self.wakes.ping_soon()

    async def close(self) -> None:
        if self.wakes is not None:
            self.wakes.close()
        await self.db.dispose()
        await self.limiter.close()
        if self.redis is not None:
            await self.redis.aclose()


def build(
    settings: Settings,
    *,
    commit_in_loop: bool = False,
    api_first: Literal["announce", "defer"] | None = None,
) -> Services:
    """`commit_in_loop`, `api_first`: see `Database`; the first for the API of a process
    that does not deliver, the second "announce" there and "defer" in a delivery process."""
    redis_client: Any = None
    guard: ReplayGuard = MemoryReplayGuard()
    if settings.redis_url:
        import redis.asyncio as aioredis

        redis_client = aioredis.from_url(settings.redis_url)
        guard = RedisReplayGuard(redis_client)
    return Services(
        settings=settings,
        db=Database(
            settings.db_url,
            lock_timeout=settings.db_lock_timeout,
            cache_seconds=settings.cache_seconds,
            commit_in_loop=commit_in_loop,
            api_first=api_first,
        ),
        box=SecretBox(settings.resolved_secret_key()),
        limiter=RateLimiter(settings.redis_url, redis=redis_client),
        replay_guard=guard,
        redis=redis_client,
        wakes=WakeSender.create(directory(settings.data_dir)),
    )
