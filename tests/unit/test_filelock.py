"""WriterLock: the SQLite writer's lock between processes. flock locks belong to the open
file description, so two WriterLocks on one path in one process stand for two processes;
one WriterLock used by successive callers is one process (as Database uses it)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from pathlib import Path

import pytest

from sendkit.errors import ServiceUnavailable
from sendkit.filelock import ApiBusy, WriterLock


def held_elsewhere(path: Path) -> bool:
    """Could a third process take the lock right now?"""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


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


async def test_a_timed_out_wait_hands_a_late_lock_back(tmp_path: Path) -> None:
    path = tmp_path / "db.writer-lock"
    other, ours = WriterLock(path, 5), WriterLock(path, 0.2)
    await other.acquire()
    with pytest.raises(ServiceUnavailable):
        await ours.acquire()
    other.release()
    await asyncio.sleep(0.2)
    # Our abandoned wait got the lock after all, and nobody took it over: given back.
    assert not held_elsewhere(path)
    other.close()
    ours.close()


async def test_the_next_caller_takes_over_a_timed_out_wait(tmp_path: Path) -> None:
    path = tmp_path / "db.writer-lock"
    other, ours = WriterLock(path, 5), WriterLock(path, 0.2)
    await other.acquire()
    with pytest.raises(ServiceUnavailable):
        await ours.acquire()
    ours.timeout = 5
    taking_over = asyncio.create_task(ours.acquire())
    await asyncio.sleep(0.1)
    assert not taking_over.done()
    other.release()
    await taking_over
    await asyncio.sleep(0.1)  # the old wait's completion must not unlock it
    assert held_elsewhere(path), "the lock was lost to another process"
    ours.release()
    assert not held_elsewhere(path)
    other.close()
    ours.close()


async def test_a_cancelled_wait_hands_a_late_lock_back(tmp_path: Path) -> None:
    path = tmp_path / "db.writer-lock"
    other, ours = WriterLock(path, 5), WriterLock(path, 5)
    await other.acquire()
    waiting = asyncio.create_task(ours.acquire())
    await asyncio.sleep(0.1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    other.release()
    await asyncio.sleep(0.2)
    assert not held_elsewhere(path)
    other.close()
    ours.close()


def test_an_api_process_says_it_is_saturated_until_it_withdraws(tmp_path: Path) -> None:
    """ApiBusy on one path in two instances: an API process and a delivery process."""
    path = tmp_path / "db.api-busy"
    api, delivery = ApiBusy(path), ApiBusy(path)
    other_api = ApiBusy(path)
    try:
        assert not delivery.announced()
        api.announce()
        api.announce()  # idempotent
        other_api.announce()  # shared: several API processes at once
        assert delivery.announced()
        api.withdraw()
        assert delivery.announced()  # the other one still is
        other_api.withdraw()
        assert not delivery.announced()
        api.withdraw()  # twice is harmless
        assert not delivery.announced()
    finally:
        for busy in (api, delivery, other_api):
            busy.close()


def test_a_delivery_process_defers_for_a_bounded_time(tmp_path: Path) -> None:
    path = tmp_path / "db.api-busy"
    api, delivery = ApiBusy(path), ApiBusy(path)
    try:
        started = time.monotonic()
        delivery.defer(1.0)
        assert time.monotonic() - started < 0.1  # nobody is saturated: no wait
        api.announce()
        started = time.monotonic()
        delivery.defer(0.2)
        assert 0.2 <= time.monotonic() - started < 0.5  # bounded: delivery goes on
    finally:
        api.close()
        delivery.close()


def test_an_api_process_that_exits_stops_saying_so(tmp_path: Path) -> None:
    """A crashed API process must not hold delivery back: its flock goes with it."""
    path = tmp_path / "db.api-busy"
    api, delivery = ApiBusy(path), ApiBusy(path)
    try:
        api.announce()
        assert delivery.announced()
        api.close()  # what the kernel does to a dead process's descriptors
        assert not delivery.announced()
    finally:
        delivery.close()
