"""One way for a test server to be a context manager, sync or async."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Self


class StartStop:
    """Subclasses define blocking `start()` and `stop()`; the async forms run them in a
    thread so a test's event loop keeps serving while a server starts or stops."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)
