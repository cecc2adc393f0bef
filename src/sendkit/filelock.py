"""The SQLite writer's lock between processes (several `sendkit serve` processes, a CLI
command, `sendkit worker`).

SQLite would serialise them itself, but its busy handler sleeps and retries (1, 2, 5 …
100 ms), which puts whole sleeps into the API's latency. An `flock` waiter is woken by
the kernel the moment the holder lets go. The wait happens in a daemon thread (it must
never hold up the interpreter's exit), so the event loop goes on serving.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
import time
from pathlib import Path

from sendkit.errors import ServiceUnavailable

# `WriterLock.hold`'s polling (seconds)
_FIRST_PAUSE = 0.00005
_SHORT_WAIT, _SHORT_WAIT_PAUSE = 0.01, 0.0001
_LONG_WAIT_PAUSE = 0.001


class WriterLock:
    """Held by at most one transaction of one process at a time; callers in one process
    are serialised before they get here (Database's asyncio lock).

    A caller that gives up (timeout or cancelled) leaves its wait running: the next
    caller takes it over, and if nobody does by the time it gets the lock, the lock is
    handed straight back. Two waits never run at once on the one descriptor, since flock
    locks belong to the descriptor: a second one would succeed while the first holds it.
    """

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._fd: int | None = None
        self._wait: asyncio.Future[None] | None = None
        self._abandoned = False

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = _open_lock_file(self.path)
        return self._fd

    async def acquire(self) -> None:
        fd = self._descriptor()
        if self._wait is None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return  # uncontended: no thread
            except BlockingIOError:
                pass
            self._wait = self._start_wait(fd)
        wait = self._wait
        self._abandoned = False
        try:
            await asyncio.wait_for(asyncio.shield(wait), self.timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if _succeeded(wait):  # got it at the same moment: ours to keep or give back
                self._wait = None
                if isinstance(exc, TimeoutError):
                    return
                self.release()
                raise
            self._abandoned = True
            if isinstance(exc, TimeoutError):
                raise ServiceUnavailable() from None
            raise
        self._wait = None  # done, and the lock is ours (a failed wait raised above)

    def usable_from_thread(self) -> bool:
        """Whether a thread may take the lock with `hold()` now: its file opens, and no
        abandoned wait of an earlier caller is still running on the descriptor (its late
        success would share this descriptor's lock, then hand it back mid-transaction)."""
        if self._wait is not None:
            return False
        try:
            self._descriptor()
        except OSError:
            return False
        return True

    def try_hold(self) -> bool:
        """Take the lock if it is free this moment, from any thread, without waiting."""
        try:
            fcntl.flock(self._descriptor(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def hold(self, timeout: float) -> bool:
        """Take the lock from the calling thread (the SQLite writer thread: no thread
        started and no event-loop round trip per hand-off); False if it stayed taken for
        `timeout` seconds. A thread blocked in flock cannot be woken early, and one stuck
        there would hold up every later write of its process, so this polls: every
        50-100 µs for the first 10 ms (the usual wait, for another process's one
        transaction: a longer pause is added to every group's latency), then backing
        off to 1 ms."""
        started = time.monotonic()
        deadline = started + timeout
        pause = _FIRST_PAUSE
        while not self.try_hold():
            now = time.monotonic()
            if now >= deadline:
                return False
            time.sleep(pause)
            cap = _SHORT_WAIT_PAUSE if now - started < _SHORT_WAIT else _LONG_WAIT_PAUSE
            pause = min(pause * 2, cap)
        return True

    def _start_wait(self, fd: int) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        wait: asyncio.Future[None] = loop.create_future()

        def block() -> None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                loop.call_soon_threadsafe(_settle, wait, exc)
            else:
                loop.call_soon_threadsafe(_settle, wait, None)

        wait.add_done_callback(self._wait_done)
        threading.Thread(target=block, name="sendkit-writer-lock", daemon=True).start()
        return wait

    def _wait_done(self, wait: asyncio.Future[None]) -> None:
        if self._wait is not wait or not self._abandoned:
            return  # a caller is awaiting it and now holds the lock
        self._wait = None
        self._abandoned = False
        if _succeeded(wait):
            self.release()  # nobody took it over: hand it straight back

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _open_lock_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:
        # Created by another user (a root CLI run): flock works on any descriptor.
        return os.open(path, os.O_RDONLY)


def _succeeded(wait: asyncio.Future[None]) -> bool:
    return wait.done() and not wait.cancelled() and wait.exception() is None


def _settle(wait: asyncio.Future[None], error: OSError | None) -> None:
    if wait.done():
        return
    if error is None:
        wait.set_result(None)
    else:
        wait.set_exception(error)


class ApiBusy:
    """Whether an API process is saturated, between processes: each API process that is
    holds a shared flock on one file. Delivery processes look before they claim or take
    the writer lock, and let it go first.

    A burst of requests is answered before the queue it fills is delivered, as
    `worker_niceness` intends for the CPU; niceness alone did not do it here. A delivery
    transaction holds the writer lock for milliseconds, in which the API's groups wait;
    and what it claims keeps the delivery and signing processes busy on the CPU the API
    needed (a quick intake beside delivery: 3,600 -> 4,600-5,100 requests a second). Every
    wait is bounded, so delivery goes on, more slowly, under any load.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._announced = False
        self.last = 0.0  # time.monotonic() of the last announce()

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = _open_lock_file(self.path)
        return self._fd

    def announce(self) -> None:
        """This API process is saturated (idempotent). Best effort: a delivery process
        looking at this instant, or a file that cannot be opened, costs only priority."""
        self.last = time.monotonic()
        if self._announced:
            return
        try:
            fcntl.flock(self._descriptor(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return
        self._announced = True

    def withdraw(self) -> None:
        if self._announced and self._fd is not None:
            self._announced = False
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def announced(self) -> bool:
        """Whether any API process says it is saturated now."""
        try:
            fd = self._descriptor()
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False  # no file to look at: no priority
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False

    def defer(self, longest: float) -> None:
        """Wait on the calling thread while an API process is saturated, for `longest`
        seconds at most."""
        deadline = time.monotonic() + longest
        while self.announced() and time.monotonic() < deadline:
            time.sleep(_DEFER_PAUSE)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._announced = False


_DEFER_PAUSE = 0.001
