"""The asyncpg connection SendKit's PostgreSQL engine opens."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg


class CancellableConnection(asyncpg.Connection):  # type: ignore[misc]
    """An asyncpg connection whose executemany can be cancelled.

    asyncpg (0.32) sends an executemany's rows in chunks as the socket drains. Cancelled
    in between, it swallows the cancellation (a `return` in a `finally`) and waits for
    the server's reply to the statement; but the server is still reading rows and sends
    nothing until the closing Sync, which never comes. The task never ends and the rows it
    updated stay locked. Here the statement runs in a task of its own, and cancelling the
    caller closes the connection instead: the server rolls the transaction back and the
    caller's cancellation goes on. SQLAlchemy discards a connection whose statement was
    cancelled anyway.
    """

    async def executemany(
        self,
        command: str,
        args: Any,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (asyncpg's own signature)
    ) -> None:
        running = asyncio.ensure_future(super().executemany(command, args, timeout=timeout))
        try:
            await asyncio.shield(running)
        except asyncio.CancelledError:
            # Whatever it ends with is nobody's to read now: retrieved, not logged.
            running.add_done_callback(_consume)
            if not running.done():
                self.terminate()
                # Closing does not wake a statement still waiting to send more rows.
                running.cancel()
            raise


def _consume(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()
