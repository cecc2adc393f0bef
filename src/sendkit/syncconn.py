"""Running the async write functions on a synchronous connection, in one thread hop.

Write functions (`Database.write`, `write_batch`) are coroutines over an
`AsyncConnection` and await nothing but the database. On SQLite every such await is a
hop to aiosqlite's thread and back through a busy event loop: a group of a dozen
statements took 10-50 ms of waiting, and the single writer lock was held all along.
`run_to_end` drives the same coroutine over `SyncBackedConnection`, whose methods never
suspend, so a whole transaction runs on the writer thread and the loop hears once.
"""

from __future__ import annotations

from collections.abc import Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.engine import CursorResult, Dialect, Result, ScalarResult
from sqlalchemy.ext.asyncio import AsyncConnection

T = TypeVar("T")

Params = Mapping[str, Any] | Sequence[Mapping[str, Any]] | None


class NotSynchronous(RuntimeError):
    """A write function awaited something other than the database."""


def run_to_end(coro: Coroutine[Any, Any, T]) -> T:
    """The value of a coroutine that finishes without suspending."""
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coro.close()
    raise NotSynchronous("a write function must await only its connection")


class _Savepoint:
    def __init__(self, transaction: sa.NestedTransaction) -> None:
        self._transaction = transaction

    async def __aenter__(self) -> _Savepoint:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is not None:
            self._transaction.rollback()
            return
        try:
            self._transaction.commit()
        except BaseException:
            self._transaction.rollback()
            raise


def _read_whole(result: CursorResult[Any]) -> Result[Any]:
    """Rows read at once, as aiosqlite does: an open statement would stop the savepoint's
    release and the group's COMMIT ("SQL statements in progress"), failing every caller
    in the group for one function that left a result unread."""
    if not result.returns_rows:
        return result
    return result.freeze()()


class SyncBackedConnection:
    """The part of `AsyncConnection` write functions use, over a sync `Connection`."""

    def __init__(self, conn: sa.Connection) -> None:
        self._conn = conn

    @property
    def dialect(self) -> Dialect:
        return self._conn.dialect

    async def execute(self, statement: Any, parameters: Params = None) -> Result[Any]:
        return _read_whole(self._conn.execute(statement, parameters))

    async def scalar(self, statement: Any, parameters: Mapping[str, Any] | None = None) -> Any:
        return self._conn.scalar(statement, parameters)

    async def scalars(self, statement: Any, parameters: Params = None) -> ScalarResult[Any]:
        return _read_whole(self._conn.execute(statement, parameters)).scalars()

    async def exec_driver_sql(self, statement: str, parameters: Any = None) -> Result[Any]:
        return _read_whole(self._conn.exec_driver_sql(statement, parameters))

    def begin_nested(self) -> _Savepoint:
        return _Savepoint(self._conn.begin_nested())

    def as_async(self) -> AsyncConnection:
        """Typed as what the write functions take; they use only the methods above."""
        return cast(AsyncConnection, self)
