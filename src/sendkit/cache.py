"""A small time-bounded cache for the lookups every API request repeats (key, sender).

Writes in this process that change what is cached clear it at once; another process's
writes (a CLI command, a second API process) are seen within `ttl` seconds. `ttl=0`
turns caching off.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

_MAX_ENTRIES = 10_000

T = TypeVar("T")


class TtlCache:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[Hashable, tuple[float, Any]] = {}
        self._loading: dict[Hashable, asyncio.Future[Any]] = {}
        self._generation = 0

    def get(self, key: Hashable) -> Any | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, key: Hashable, value: Any) -> None:
        if self.ttl <= 0:
            return
        if len(self._entries) >= _MAX_ENTRIES:
            self._entries.clear()  # cheaper than LRU bookkeeping on the hot path
        self._entries[key] = (time.monotonic() + self.ttl, value)

    async def get_or_load(self, key: Hashable, load: Callable[[], Awaitable[T]]) -> T:
        """The cached value, or one `load()` shared by every caller that misses at once:
        when an entry expires under load, one query refreshes it, not one per request."""
        entry = self._entries.get(key)
        if entry is not None and entry[0] >= time.monotonic():
            return entry[1]  # type: ignore[no-any-return]
        pending = self._loading.get(key)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not pending.cancelled() or (task is not None and task.cancelling()):
                    raise  # this caller was cancelled
                # only the loading caller was cancelled: load here instead
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        generation = self._generation
        try:
            value = await load()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else must log it
            raise
        finally:
            if self._loading.get(key) is future:  # not a newer load after a clear()
                del self._loading[key]
        if generation == self._generation:  # a clear() during the load makes it stale
            self.put(key, value)
        future.set_result(value)
        return value

    def clear(self) -> None:
        self._entries.clear()
        self._loading.clear()
        self._generation += 1
