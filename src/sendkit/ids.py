"""Identifiers that sort by creation time: message ids and request ids.

Random keys land anywhere in a B-tree. With uuid4 request ids and random message ids,
every submitted message wrote to a random page of the messages' primary key and
request-id indexes (and of the events' message-id index), and once the tables outgrew
SQLite's page cache each of those was a read from disk too: about 90 µs of the single
writer's CPU per message, against 24 µs with keys that grow with time (bench/README.md).

Both keep their public shape: a message id is 32 hex digits, a request id a UUID
(version 7, RFC 9562). Each carries the creation time in milliseconds (the API's `ts`
says as much) and 80 or 74 random bits, so neither can be guessed (a message id is in
the VERP return path that bounces come back to).
"""

from __future__ import annotations

import os
import threading
import time

_POOL_BYTES = 4096


class _RandomPool:
    """os.urandom bytes read 4 KB at a time: one system call for hundreds of ids."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._used = 0

    def take(self, size: int) -> bytes:
        with self._lock:
            if self._used + size > len(self._buffer):
                self._buffer = os.urandom(_POOL_BYTES)
                self._used = 0
            start = self._used
            self._used += size
            return self._buffer[start : self._used]

    def forget(self) -> None:
        """In a forked child: never hand out the parent's bytes again."""
        self._lock = threading.Lock()
        self._buffer = b""
        self._used = 0


_pool = _RandomPool()
os.register_at_fork(after_in_child=_pool.forget)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def message_id() -> str:
    """32 lowercase hex digits: 48 bits of time, 80 random bits."""
    return f"{_now_ms():012x}{_pool.take(10).hex()}"


def request_id() -> str:
    """A UUIDv7 string: 48 bits of time, version and variant, 74 random bits."""
    tail = bytearray(_pool.take(10))
    tail[0] = 0x70 | (tail[0] & 0x0F)  # version 7
    tail[2] = 0x80 | (tail[2] & 0x3F)  # RFC 9562 variant
    digits = f"{_now_ms():012x}{tail.hex()}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"
