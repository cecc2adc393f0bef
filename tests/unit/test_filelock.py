"""WriterLock: the SQLite writer's lock between processes (one open file each; flock
locks of two descriptors conflict even within one process, which these tests use)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from sendkit.errors import ServiceUnavailable
from sendkit.filelock import WriterLock


async def test_a_waiter_gets_the_lock_as_soon_as_it_is_released(tmp_path: Path) -> None:
    path = tmp_path / "db.writer-lock"
    first, second = WriterLock(path, 5), WriterLock(path, 5)
    await first.acquire()
    waiting = asyncio.create_task(second.acquire())
    await asyncio.sleep(0.2)
    assert not waiting.done(), "two holders at once"
    released = time.monotonic()
    first.release()
    await waiting
    # Woken by the kernel, not by a retry loop's sleep.
    assert time.monotonic() - released < 0.1
    second.release()
    first.close()
    second.close()


async def test_a_timed_out_waiter_answers_503_and_hands_a_late_lock_back(tmp_path: Path) -> None:
    path = tmp_path / "db.writer-lock"
    holder, late, third = WriterLock(path, 5), WriterLock(path, 0.2), WriterLock(path, 2)
    await holder.acquire()
    with pytest.raises(ServiceUnavailable):
        await late.acquire()
    holder.release()
    # The timed-out waiter's thread got the lock after all and must have let it go.
    await third.acquire()
    third.release()
    for lock in (holder, late, third):
        lock.close()


async def test_a_cancelled_waiter_hands_a_late_lock_back(tmp_path: Path) -> None:
    path = tmp_path / "db.writer-lock"
    holder, cancelled, third = WriterLock(path, 5), WriterLock(path, 5), WriterLock(path, 2)
    await holder.acquire()
    waiting = asyncio.create_task(cancelled.acquire())
    await asyncio.sleep(0.1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    holder.release()
    await third.acquire()
    third.release()
    for lock in (holder, cancelled, third):
        lock.close()
