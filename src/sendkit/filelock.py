"""The SQLite writer's lock between processes (several `sendkit serve` processes, a CLI
command, `sendkit worker`).

SQLite would serialise them itself, but its busy handler sleeps and retries (1, 2, 5 …
100 ms), which puts whole sleeps into the API's latency. An `flock` waiter is woken by
the kernel the moment the holder lets go. The wait happens in a thread of its own (not
the default executor, which DKIM signing keeps busy), so the event loop goes on serving.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sendkit.errors import ServiceUnavailable


class WriterLock:
    """Held by at most one transaction of one process at a time; callers in one process
    are serialised before they get here (Database's asyncio lock)."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._fd: int | None = None
        self._waiter: ThreadPoolExecutor | None = None

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        return self._fd

    async def acquire(self) -> None:
        fd = self._descriptor()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return  # uncontended: no thread
        except BlockingIOError:
            pass
        if self._waiter is None:
            self._waiter = ThreadPoolExecutor(1, thread_name_prefix="sendkit-writer-lock")
        loop = asyncio.get_running_loop()
        waiting = loop.run_in_executor(self._waiter, fcntl.flock, fd, fcntl.LOCK_EX)
        try:
            await asyncio.wait_for(asyncio.shield(waiting), self.timeout)
        except TimeoutError:
            waiting.add_done_callback(self._release_if_acquired)
            raise ServiceUnavailable() from None
        except asyncio.CancelledError:
            waiting.add_done_callback(self._release_if_acquired)
            raise

    def _release_if_acquired(self, waiting: asyncio.Future[None]) -> None:
        # The caller gave up, but the thread may still get the lock: hand it straight back.
        if not waiting.cancelled() and waiting.exception() is None:
            self.release()

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._waiter is not None:
            self._waiter.shutdown(wait=False, cancel_futures=True)
            self._waiter = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
