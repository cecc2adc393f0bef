"""Where DKIM signatures are computed: in processes of their own, in batches.

Signing is most of a delivery's CPU (an RSA-2048 signature is ~0.3 ms). In threads of
the delivery process it shares the GIL with the event loop: every signature needs the
GIL a few times, each wait stalls either the loop or the signer, and a delivery process
measured ~1,170 messages a second against ~1,950 with signing in a process beside it
(bench/README.md, fifth round). So a delivery process hands its signatures to a small
pool of processes; requests that arrive while a batch is out go together in the next
one, so the pipe costs one round trip per batch rather than per message.

The processes run `sendkit.signing_child` (plain subprocesses with pipes: a
multiprocessing child re-imports the parent's `__main__`, the whole app, ~90 MB of it).
`SENDKIT_SIGNING_PROCESSES=0` keeps the old way: threads of the delivery process.
"""

from __future__ import annotations

import asyncio
import collections
import os
import sys
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from sendkit import dkim, framing, logs, signing_child

__all__ = ["ProcessSigner", "Signer", "ThreadSigner", "start"]

log = logs.get("sendkit.signing")

# A batch this big takes a signing process ~25 ms: small enough that a message never
# waits long behind others, big enough that the pipe's cost per message is small.
_BATCH_MAX = 64
_BATCH_BYTES = 8 * 1024 * 1024
_STOP_SECONDS = 5.0
_MAX_PAUSE_SECONDS = 60.0
# A batch takes a signing process milliseconds (even niced under load, well under a
# second): one silent this long is stopped or wedged.
_ANSWER_SECONDS = 30.0

_Request = tuple[bytes, dkim.DkimKey, int]


class Signer(Protocol):
    async def sign(self, message: bytes, key: dkim.DkimKey, now: int) -> bytes:
        """The DKIM-Signature field for `message` (see `dkim.sign`)."""
        ...

    async def close(self) -> None: ...


class ThreadSigner:
    """Threads of this process (`dkim.sign_in_pool`)."""

    async def sign(self, message: bytes, key: dkim.DkimKey, now: int) -> bytes:
        return await dkim.sign_in_pool(message, key, now)

    async def close(self) -> None:
        """The threads are the process's: nothing to stop."""


class _Pending:
    __slots__ = ("future", "request")

    def __init__(self, request: _Request, future: asyncio.Future[bytes]) -> None:
        self.request = request
        self.future = future


def _settle(batch: list[_Pending], results: list[bytes | ValueError]) -> None:
    for item, result in zip(batch, results, strict=True):
        if item.future.done():  # its caller was cancelled
            continue
        if isinstance(result, ValueError):
            item.future.set_exception(result)
        else:
            item.future.set_result(result)


def _fail(batch: list[_Pending], error: BaseException) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(error)


class _Child:
    """One signing process (`sendkit.signing_child`) and the batches it has been sent,
    whose results come back in the same order."""

    def __init__(self, process: asyncio.subprocess.Process, answer_within: float) -> None:
        self.process = process
        self.answer_within = answer_within
        self.sent: collections.deque[list[_Pending]] = collections.deque()
        # Armed while batches are out: silence this long with work to do ends the process.
        self._deadline: asyncio.TimerHandle | None = None
        self.answered = False
        self.broken = False

    @property
    def usable(self) -> bool:
        stdin = self.process.stdin
        return (
            not self.broken
            and self.process.returncode is None
            and stdin is not None
            and not stdin.is_closing()
        )

    def send(self, batch: list[_Pending]) -> None:
        # Counted as sent first: should the write fail, the reader signs the batch
        # elsewhere with the others this process had.
        self.sent.append(batch)
        try:
            stdin = self.process.stdin
            assert stdin is not None
            stdin.write(framing.frame([item.request for item in batch]))
        except Exception:  # it exited meanwhile (uvloop closes the pipe at once)
            log.warning("signing_process_write_failed", exc_info=True)
            self.abandon()
            return
        if self._deadline is None:
            self._arm()

    def answered_one(self) -> list[_Pending]:
        """The oldest batch, now answered: the silence is counted afresh."""
        self._disarm()
        batch = self.sent.popleft()
        if self.sent:
            self._arm()
        return batch

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.answer_within, self._overdue)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _overdue(self) -> None:
        self._deadline = None
        log.warning("signing_process_silent", pid=self.process.pid)
        self.abandon()

    def abandon(self) -> None:
        """No more work for it: killed, its reader sees the end and cleans up."""
        self.broken = True
        self._disarm()
        if self.process.returncode is None:
            self.process.kill()

    async def results(self) -> list[bytes | ValueError]:
        stdout = self.process.stdout
        assert stdout is not None
        results: list[bytes | ValueError] = await framing.read_frame(stdout)
        return results

    async def end(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()


class ProcessSigner:
    """`processes` signing processes fed in batches, at most two out at each at once so
    that it always has its next batch.

    A process that dies (killed, out of memory), answers out of step or stays silent
    for `answer_within` seconds with batches out costs no signature: the batches it had
    are signed in this process's threads, and a new process takes its place. Processes
    that end before answering anything (cannot start) are tried again after a growing
    pause, up to a minute; meanwhile this process's threads sign.
    """

    def __init__(
        self,
        processes: int,
        *,
        niceness: int = 0,
        command: tuple[str, ...] = (sys.executable, "-P", "-m", "sendkit.signing_child"),
        answer_within: float = _ANSWER_SECONDS,
    ) -> None:
        if processes < 1:
            raise ValueError("a process signer needs at least one process")
        self.processes = processes
        self.started = 0  # processes started so far
        self._niceness = niceness
        self._command = command
        self._answer_within = answer_within
        self._children: list[_Child] = []
        self._starting = 0
        self._failures = 0  # processes in a row that ended without answering
        self._resume_at = 0.0  # time.monotonic(): no new process before it
        self._waiting: list[_Pending] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def pids(self) -> list[int]:
        return [child.process.pid for child in self._children]

    def start(self) -> None:
        """Start the processes now, so that the first messages do not wait for them
        (outside a running loop, `sign` starts them)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._closed or time.monotonic() < self._resume_at:
            return
        while len(self._children) + self._starting < self.processes:
            self._starting += 1
            self.started += 1
            self._spawn_task(self._start_child())

    def _spawn_task(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_child(self) -> None:
        try:
            process = await asyncio.create_subprocess_exec(
                *self._command,
                str(os.getpid()),
                str(self._niceness),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
        except BaseException as exc:
            self._starting -= 1
            if not isinstance(exc, Exception):
                raise
            # No process to be had (no fork, no thread for the child watcher).
            log.exception("signing_process_not_started")
            self._pause_after_failure()
            self._send_batches()  # to threads, if no other process is left
            return
        self._starting -= 1
        child = _Child(process, self._answer_within)
        if self._closed:
            await self._stop(child)
            return
        self._children.append(child)
        self._spawn_task(self._read(child))
        self._send_batches()

    async def sign(self, message: bytes, key: dkim.DkimKey, now: int) -> bytes:
        if self._closed:
            raise RuntimeError("the signer is closed")
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Pending((message, key, now), future))
        self.start()
        self._send_batches()
        return await future

    def _send_batches(self) -> None:
        for child in self._children:
            while self._waiting and len(child.sent) < 2 and child.usable:
                child.send(self._take_waiting(self._batch_size()))
        usable = any(child.usable for child in self._children)
        if self._waiting and not usable and not self._starting:
            self._sign_here(self._take_waiting())  # no process to be had for now

    def _batch_size(self) -> int:
        # Spread what waits over the free places, so that no process idles.
        free = sum(2 - len(child.sent) for child in self._children if child.usable) or 1
        return min(_BATCH_MAX, -(-len(self._waiting) // free))

    def _take_waiting(self, size: int | None = None) -> list[_Pending]:
        size = len(self._waiting) if size is None else size
        # Bounded in bytes too: large messages go a few at a time (at least one).
        total = 0
        for index, item in enumerate(self._waiting[:size]):
            total += len(item.request[0])
            if total > _BATCH_BYTES and index > 0:
                size = index
                break
        batch, self._waiting = self._waiting[:size], self._waiting[size:]
        return batch

    async def _read(self, child: _Child) -> None:
        try:
            await self._read_answers(child)
        finally:
            # Ended, given up, out of step or silent past its time: what the process
            # still had is signed here, and another takes its place.
            self._children.remove(child)
            lost = [item for batch in child.sent for item in batch]
            child.sent.clear()
            await child.end()
            self._after_loss(child, lost)

    async def _read_answers(self, child: _Child) -> None:
        while True:
            try:
                results = await child.results()
            except Exception:  # the end of its output (ended, stopped, killed), garbage
                return
            if not child.sent or len(results) != len(child.sent[0]):
                return  # out of step: not to be trusted with more
            child.answered = True
            self._failures = 0
            _settle(child.answered_one(), results)
            self._send_batches()

    def _after_loss(self, child: _Child, lost: list[_Pending]) -> None:
        if self._closed:
            _fail(lost, RuntimeError("the signer is closed"))
            return
        code = child.process.returncode
        log.warning("signing_process_lost", exit_code=code, messages=len(lost))
        if not child.answered:
            self._pause_after_failure()  # not one process after another
        self._sign_here(lost)
        self.start()
        self._send_batches()

    def _pause_after_failure(self) -> None:
        self._failures += 1
        pause = min(_MAX_PAUSE_SECONDS, 0.5 * 2 ** (self._failures - 1))
        self._resume_at = time.monotonic() + pause
        asyncio.get_running_loop().call_later(pause, self.start)

    def _sign_here(self, batch: list[_Pending]) -> None:
        if batch:
            self._spawn_task(self._sign_in_threads(batch))

    async def _sign_in_threads(self, batch: list[_Pending]) -> None:
        requests = [item.request for item in batch]
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(
                dkim.signing_pool(), signing_child.sign_batch, requests
            )
        except BaseException as exc:  # cancelled with the loop: each caller hears it
            _fail(batch, exc)
            if not isinstance(exc, Exception):
                raise
            return
        _settle(batch, results)

    async def close(self) -> None:
        """Stop the processes; signatures still waiting fail (callers drain first)."""
        self._closed = True
        _fail(self._take_waiting(), RuntimeError("the signer is closed"))
        await asyncio.gather(*(self._stop(child) for child in list(self._children)))
        if self._tasks:  # readers finishing, a process that was still starting
            await asyncio.wait(set(self._tasks), timeout=_STOP_SECONDS)

    async def _stop(self, child: _Child) -> None:
        stdin = child.process.stdin
        if stdin is not None:
            stdin.close()  # the process ends at the end of its input
        child.broken = True
        try:
            await asyncio.wait_for(child.process.wait(), _STOP_SECONDS)
        except TimeoutError:
            await child.end()


def start(processes: int) -> Signer:
    """A signer with `processes` signing processes (0: this process's threads), started;
    whoever starts one closes it.
    Below this process's priority where `dkim` signs below the loop (an API in the same
    process: its requests first), at it in a delivery process (niced as a whole)."""
    if processes == 0:
        return ThreadSigner()
    niceness = dkim.SIGNING_NICENESS if dkim.signs_below_the_loop() else 0
    signer = ProcessSigner(processes, niceness=niceness)
    signer.start()
    return signer
