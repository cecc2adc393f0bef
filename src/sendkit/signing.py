"""Where DKIM signatures are computed: in processes of their own, in batches.

Signing is most of a delivery's CPU (an RSA-2048 signature is ~0.3 ms). In threads of
the delivery process it shares the GIL with the event loop: every signature needs the
GIL a few times, each wait stalls either the loop or the signer, and a delivery process
measured ~1,170 messages a second against ~1,950 with signing in a process beside it
(bench/README.md, fifth round). So a delivery process hands its signatures to a small
pool of processes; requests that arrive while a batch is out go together in the next
one, so the pipe costs one round trip per batch rather than per message.

`SENDKIT_SIGNING_PROCESSES=0` keeps the old way: threads of the delivery process.
This module stays light: the pool's processes import it, and `sendkit.dkim`, alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Protocol

from sendkit import dkim, logs

log = logs.get("sendkit.signing")

# A batch this big takes a signing process ~25 ms: small enough that a message never
# waits long behind others, big enough that the pipe's cost per message is small.
_BATCH_MAX = 64
_PR_SET_PDEATHSIG = 1

_Request = tuple[bytes, dkim.DkimKey, int]


class Signer(Protocol):
    async def sign(self, message: bytes, key: dkim.DkimKey, now: int) -> bytes:
        """The DKIM-Signature field for `message` (see `dkim.sign`)."""
        ...

    def close(self) -> None: ...


class ThreadSigner:
    """Threads of this process (`dkim.sign_in_pool`)."""

    async def sign(self, message: bytes, key: dkim.DkimKey, now: int) -> bytes:
        return await dkim.sign_in_pool(message, key, now)

    def close(self) -> None:
        """The threads are the process's: nothing to stop."""


def end_with_parent(parent: int) -> None:
    """SIGTERM when the parent dies without its cleanup (Linux; elsewhere a no-op),
    also if it died while this process was starting."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        raise SystemExit(0)


def _start_child(parent: int, niceness: int) -> None:
    # The parent decides when signing stops (it drains its deliveries first): a Ctrl-C
    # reaching the whole process group must not take the signer away under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    end_with_parent(parent)
    if niceness:
        with contextlib.suppress(OSError):
            os.nice(niceness)


def _ready() -> int:
    return os.getpid()


def sign_batch(requests: list[_Request]) -> list[bytes | ValueError]:
    """Runs in a signing process: one result per request, in order."""
    results: list[bytes | ValueError] = []
    for message, key, now in requests:
        try:
            results.append(dkim.sign(message, key, now))
        except ValueError as exc:
            results.append(exc)
    return results


class _Pending:
    __slots__ = ("future", "request")

    def __init__(self, request: _Request, future: asyncio.Future[bytes]) -> None:
        self.request = request
        self.future = future


class ProcessSigner:
    """`processes` signing processes (spawned: no inherited threads or sockets), fed in
    batches, at most two per process out at once so each always has its next batch.

    A process that dies (killed, out of memory) breaks the pool: the batches it had are
    signed in this process's threads instead and a fresh pool takes the next ones, so no
    message waits for a lease to run out because of it.
    """

    def __init__(self, processes: int, *, niceness: int = 0) -> None:
        if processes < 1:
            raise ValueError("a process signer needs at least one process")
        self.processes = processes
        self._niceness = niceness
        self._pool: ProcessPoolExecutor | None = None
        self._waiting: list[_Pending] = []
        self._out = 0  # batches sent and not answered yet
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def start(self) -> None:
        """Spawn the processes now, so the first messages do not wait for them."""
        pool = self._executor()
        for _ in range(self.processes):
            pool.submit(_ready)

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_child,
                initargs=(os.getpid(), self._niceness),
            )
        return self._pool

    async def sign(self, message: bytes, key: dkim.DkimKey, now: int) -> bytes:
        if self._closed:
            raise RuntimeError("the signer is closed")
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Pending((message, key, now), future))
        self._send_batches()
        return await future

    def _send_batches(self) -> None:
        limit = 2 * self.processes
        while self._waiting and self._out < limit:
            # Spread what waits over the free places, so no process idles.
            size = min(_BATCH_MAX, -(-len(self._waiting) // (limit - self._out)))
            batch, self._waiting = self._waiting[:size], self._waiting[size:]
            self._out += 1
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Pending]) -> None:
        requests = [item.request for item in batch]
        pool = self._executor()
        try:
            try:
                results = await self._in_pool(pool, requests)
            except BrokenProcessPool:
                log.warning("signing_process_lost", batch=len(batch))
                self._replace(pool)
                results = await asyncio.get_running_loop().run_in_executor(
                    dkim.signing_pool(), sign_batch, requests
                )
        except BaseException as exc:  # cancelled, or the pool shut down under it
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for item, result in zip(batch, results, strict=True):
                if item.future.done():  # its caller was cancelled
                    continue
                if isinstance(result, ValueError):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)
        finally:
            self._out -= 1
            if not self._closed:
                self._send_batches()

    async def _in_pool(
        self, pool: ProcessPoolExecutor, requests: list[_Request]
    ) -> list[bytes | ValueError]:
        return await asyncio.get_running_loop().run_in_executor(pool, sign_batch, requests)

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        # Only once per broken pool: its other batches must not take the fresh one down.
        if self._pool is broken:
            self._pool = None
        broken.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the processes; signatures still waiting fail (callers drain first)."""
        self._closed = True
        waiting, self._waiting = self._waiting, []
        for item in waiting:
            if not item.future.done():
                item.future.set_exception(RuntimeError("the signer is closed"))
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def start(processes: int) -> Signer:
    """A signer with `processes` signing processes (0: this process's threads), started.
    Below this process's priority where `dkim` signs below the loop (an API in the same
    process: its requests first), at it in a delivery process (niced as a whole)."""
    if processes == 0:
        return ThreadSigner()
    niceness = dkim.SIGNING_NICENESS if dkim.signs_below_the_loop() else 0
    signer = ProcessSigner(processes, niceness=niceness)
    signer.start()
    return signer


_shared: dict[int, Signer] = {}


def shared(processes: int) -> Signer:
    """One signer per process and size for workers built without one (tests, tools),
    kept for the process's life."""
    signer = _shared.get(processes)
    if signer is None:
        signer = _shared[processes] = start(processes)
    return signer
