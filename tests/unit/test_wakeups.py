"""The API's wake-ups of delivery processes: one datagram a loop turn, not a message."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from sendkit.wakeups import WakeSender


def _received(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            sock.recv(16)
        except BlockingIOError:
            return count
        count += 1


def test_messages_queued_in_one_loop_turn_send_one_ping(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "delivery-test.sock"))
    listener.setblocking(False)
    sender = WakeSender(tmp_path)

    async def turns() -> list[int]:
        seen = []
        for _ in range(2):
            for _ in range(10):  # a group commit answering ten sends
                sender.ping_soon()
            assert _received(listener) == 0  # not before the end of the turn
            await asyncio.sleep(0)
            seen.append(_received(listener))
        return seen

    try:
        assert asyncio.run(turns()) == [1, 1]
        sender.ping_soon()  # outside a loop: at once
        assert _received(listener) == 1
    finally:
        sender.close()
        listener.close()
