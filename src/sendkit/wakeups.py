"""Waking the delivery processes of this machine when a message is queued, rather than at
their next poll (`poll_interval`): each listens on a datagram socket of its own in the
data directory, and a process without a worker of its own sends one byte to each.

Best effort by design: a lost datagram costs one poll interval, never a message. The
sockets live in a directory only the server's user can enter, and carry no data.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path

from sendkit import logs

log = logs.get("sendkit.wakeups")

_PATTERN = "delivery-*.sock"
# Delivery processes come and go (restarts): the list is read again after this long.
_RELIST_SECONDS = 1.0


def directory(data_dir: Path) -> Path:
    # Absolute: a `sendkit worker` started elsewhere must find the same directory.
    return data_dir.resolve() / "run"


class WakeSender:
    """Used where messages are queued (the API, `sendkit smtpd`). Every queued message
    pings: a dropped ping could leave the last message of a burst to the next poll."""

    def __init__(self, where: Path) -> None:
        self._where = where
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._targets: list[str] = []
        self._listed_at = -_RELIST_SECONDS
        self._soon: asyncio.AbstractEventLoop | None = None  # a ping is scheduled there

    @classmethod
    def create(cls, where: Path) -> WakeSender | None:
        """A sender, or None where UNIX sockets do not exist (delivery polls there)."""
        try:
            return cls(where)
        except (AttributeError, OSError):
            return None

    def ping_soon(self) -> None:
        """`ping()` at the end of the loop's turn, once for every message queued in it (a
        group commit answers many at once): a datagram per message was a system call per
        request in the API, and a wake-up per message in each delivery process."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.ping()
            return
        if self._soon is loop:
            return
        self._soon = loop
        loop.call_soon(self._ping_now)

    def _ping_now(self) -> None:
        self._soon = None
        self.ping()

    def ping(self) -> None:
        now = time.monotonic()
        if now - self._listed_at >= _RELIST_SECONDS:
            self._listed_at = now
            self._targets = [str(path) for path in self._where.glob(_PATTERN)]
        for target in self._targets:
            try:
                self._socket.sendto(b"!", target)
            except ConnectionRefusedError:
                # Nobody listens there any more: a delivery process that was killed.
                with contextlib.suppress(OSError):
                    Path(target).unlink()
            except OSError:
                pass  # full or gone: that process finds the message at its next poll

    def close(self) -> None:
        self._socket.close()


class WakeReceiver:
    """Used by a delivery process: `on_wake` runs on its loop for each burst of pings."""

    def __init__(self, where: Path, on_wake: Callable[[], None]) -> None:
        self._on_wake = on_wake
        self._loop = asyncio.get_running_loop()
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Never another process's name, also across containers sharing the directory.
        self.path = where / f"delivery-{secrets.token_hex(8)}.sock"
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._socket.bind(str(self.path))  # fails beyond ~107 bytes of path
        except OSError:
            self._socket.close()
            raise
        self._socket.setblocking(False)
        self._loop.add_reader(self._socket.fileno(), self._drain)

    @classmethod
    def listen(cls, where: Path, on_wake: Callable[[], None]) -> WakeReceiver | None:
        """A receiver, or None (and polling alone) where the socket cannot be made."""
        try:
            return cls(where, on_wake)
        except (AttributeError, OSError) as exc:
            log.warning("wakeups_unavailable", error=str(exc))
            return None

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._socket.recv(64):
                pass
        self._on_wake()

    def close(self) -> None:
        self._loop.remove_reader(self._socket.fileno())
        self._socket.close()
        self.path.unlink(missing_ok=True)
