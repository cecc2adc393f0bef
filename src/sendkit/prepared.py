"""Core statements compiled once per dialect and run as driver SQL.

A send's group commit runs the same few statements for every group. Through
`Connection.execute` each costs SQLAlchemy's per-execution work again (cache key, bind
processing per row, result metadata): on the SQLite writer thread that was most of a
group's CPU, and it holds the GIL the API's event loop needs. A `Prepared` statement is
written with Core (so it reads like every other query and each dialect renders its own
SQL), compiled once, and executed with `exec_driver_sql`. Only for statements whose
parameters need no type processing: strings, integers and None.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Dialect, Result
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import TextClause

Build = Callable[[str], ClauseElement]


# Bound parameters per SQLite statement: the limit of SQLite builds before 3.32.
_SQLITE_MAX_PARAMS = 999


class Prepared:
    """`build(dialect_name)` gives the statement; its bind parameters are named.

    `multi_row`: for a plain `INSERT ... VALUES (...)` whose parameters are named after
    their columns, `execute_many` sends the rows in few statements: on SQLite as
    multi-row VALUES lists (as many rows as a statement takes), on PostgreSQL as one
    INSERT ... SELECT from unnest() of an array per column. pysqlite's
    executemany steps each row on its own and hands the GIL back and forth around each
    step; on the writer thread each hand-back can wait for the busy event loop, with the
    writer lock held all along."""

    def __init__(self, build: Build, *, multi_row: bool = False) -> None:
        self._build = build
        self._multi_row = multi_row
        self._compiled: dict[str, tuple[str, tuple[str, ...]] | None] = {}
        self._multi: dict[int, str] = {}
        self._unnest: str | None = None

    def sql(self, dialect: Dialect) -> tuple[str, tuple[str, ...]] | None:
        """The driver's SQL and the parameter names in their positional order; None for
        a driver with named parameters (psycopg), which gets the Core statement."""
        key = f"{dialect.name}+{dialect.driver}"
        if key not in self._compiled:
            compiled = cast(SQLCompiler, self._build(dialect.name).compile(dialect=dialect))
            self._compiled[key] = (
                (compiled.string, tuple(compiled.positiontup or ()))
                if compiled.positional
                else None
            )
        return self._compiled[key]

    def _statement(self, dialect: str) -> Executable:
        return cast(Executable, self._build(dialect))

    async def execute(self, conn: AsyncConnection, params: Mapping[str, Any]) -> Result[Any]:
        found = self.sql(conn.dialect)
        if found is None:
            return await conn.execute(self._statement(conn.dialect.name), dict(params))
        sql, names = found
        return await conn.exec_driver_sql(sql, tuple(params[n] for n in names))

    async def execute_many(self, conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> None:
        found = self.sql(conn.dialect)
        if found is None:
            await conn.execute(self._statement(conn.dialect.name), [dict(row) for row in rows])
            return
        sql, names = found
        if self._multi_row and conn.dialect.name == "postgresql":
            # One execution for all rows: each column a typed array, zipped by unnest.
            # asyncpg's executemany binds and executes the statement once per row, and
            # each execution costs the server ~20 us (the events and attempts of a
            # delivered message were ~50 us of PostgreSQL's ~220 us).
            columns = [[row[n] for row in rows] for n in names]
            await conn.exec_driver_sql(self._unnest_sql(conn.dialect, names), tuple(columns))
            return
        if not (self._multi_row and conn.dialect.name == "sqlite"):
            await conn.exec_driver_sql(sql, [tuple(row[n] for n in names) for row in rows])
            return
        per_statement = max(1, _SQLITE_MAX_PARAMS // max(1, len(names)))
        for start in range(0, len(rows), per_statement):
            chunk = rows[start : start + per_statement]
            flat = tuple(row[n] for row in chunk for n in names)
            await conn.exec_driver_sql(self._multi_sql(sql, len(chunk)), flat)

    def _unnest_sql(self, dialect: Dialect, names: tuple[str, ...]) -> str:
        """`INSERT INTO t (a, b) SELECT * FROM unnest($1::A[], $2::B[])` for this plain
        insert, whose parameters are named after their columns."""
        found = self._unnest
        if found is None:
            insert = cast(sa.Insert, self._build(dialect.name))
            table = cast(sa.Table, insert.table)
            types = [table.c[name].type.compile(dialect=dialect) for name in names]
            arrays = ", ".join(f"${i}::{kind}[]" for i, kind in enumerate(types, start=1))
            columns = ", ".join(names)
            found = self._unnest = (
                f"INSERT INTO {table.name} ({columns}) SELECT * FROM unnest({arrays})"  # noqa: S608 (our names)
            )
        return found

    def _multi_sql(self, sql: str, count: int) -> str:
        found = self._multi.get(count)
        if found is None:
            head, values, group = sql.rpartition(" VALUES ")
            if not values or not group.startswith("(") or not group.endswith(")"):
                raise ValueError("multi_row needs a plain INSERT ... VALUES (...)")
            found = self._multi[count] = f"{head} VALUES {', '.join([group] * count)}"
        return found


def json_rows(dialect: str, width: int) -> TextClause:
    """The rows of the JSON array of `width`-element arrays bound as `:rows`, as a
    subquery for `IN`: one statement for any number of keys, where an expanding IN list
    is rendered again by SQLAlchemy on every execution (and is a new SQL text per size)."""
    if dialect == "postgresql":
        columns = ", ".join(f"r->>{i}" for i in range(width))
        sql = f"SELECT {columns} FROM jsonb_array_elements(CAST(:rows AS jsonb)) AS r"  # noqa: S608 (width: our int)
    else:
        columns = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(width))
        sql = f"SELECT {columns} FROM json_each(:rows)"  # noqa: S608 (width: our int)
    return sa.text(sql)


def rows_param(rows: Sequence[Sequence[str]]) -> dict[str, str]:
    """The `:rows` parameter of `json_rows`."""
    return {"rows": orjson.dumps(list(rows)).decode()}
