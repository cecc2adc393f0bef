"""TtlCache.get_or_load: one load for every caller that misses at once."""

from __future__ import annotations

import asyncio

import pytest

from sendkit.cache import TtlCache


class Loader:
    def __init__(self, value: str = "v", fail: bool = False) -> None:
        self.calls = 0
        self.value = value
        self.fail = fail
        self.release = asyncio.Event()

    async def __call__(self) -> str:
        self.calls += 1
        await self.release.wait()
        if self.fail:
            raise LookupError("not found")
        return self.value


async def test_concurrent_misses_share_one_load() -> None:
    cache, load = TtlCache(60), Loader()
    callers = [asyncio.create_task(cache.get_or_load("k", load)) for _ in range(50)]
    await asyncio.sleep(0)
    load.release.set()
    assert await asyncio.gather(*callers) == ["v"] * 50
    assert load.calls == 1
    assert await cache.get_or_load("k", load) == "v" and load.calls == 1


async def test_a_failed_load_reaches_every_waiter_and_is_not_cached() -> None:
    cache, load = TtlCache(60), Loader(fail=True)
    callers = [asyncio.create_task(cache.get_or_load("k", load)) for _ in range(5)]
    await asyncio.sleep(0)
    load.release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, LookupError) for r in results)
    assert load.calls == 1 and cache.get("k") is None


async def test_a_clear_during_the_load_keeps_its_answer_out_of_the_cache() -> None:
    cache, load = TtlCache(60), Loader()
    caller = asyncio.create_task(cache.get_or_load("k", load))
    await asyncio.sleep(0)
    cache.clear()  # e.g. a key was revoked while its old row was being read
    load.release.set()
    assert await caller == "v"
    assert cache.get("k") is None


async def test_a_cancelled_loader_lets_a_waiter_load_itself() -> None:
    cache, slow = TtlCache(60), Loader()
    first = asyncio.create_task(cache.get_or_load("k", slow))
    await asyncio.sleep(0)
    fast = Loader("w")
    fast.release.set()
    waiter = asyncio.create_task(cache.get_or_load("k", fast))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await waiter == "w" and fast.calls == 1


async def test_ttl_zero_caches_nothing() -> None:
    cache, load = TtlCache(0), Loader()
    load.release.set()
    await cache.get_or_load("k", load)
    await cache.get_or_load("k", load)
    assert load.calls == 2


async def test_a_load_started_after_a_clear_stays_shared() -> None:
    cache, old, new = TtlCache(60), Loader("old"), Loader("new")
    first = asyncio.create_task(cache.get_or_load("k", old))
    await asyncio.sleep(0)
    cache.clear()
    second = asyncio.create_task(cache.get_or_load("k", new))
    await asyncio.sleep(0)
    old.release.set()
    assert await first == "old"
    third = asyncio.create_task(cache.get_or_load("k", Loader("unused")))
    await asyncio.sleep(0)
    new.release.set()
    assert await second == await third == "new"
