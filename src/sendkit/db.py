"""Engines for SQLite and PostgreSQL, the transaction helper, and the table definitions.

Times are integer milliseconds since the epoch (UTC) on both databases: they compare,
index and serialise the same way everywhere, and the API's `ts` is milliseconds too.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from sendkit import logs
from sendkit.cache import TtlCache
from sendkit.errors import SendKitError, ServiceUnavailable
from sendkit.filelock import ApiBusy, WriterLock
from sendkit.syncconn import NotSynchronous, SyncBackedConnection, run_to_end

T = TypeVar("T")

log = logs.get("sendkit.db")

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _id() -> sa.Column[str]:
    return sa.Column("id", sa.String(32), primary_key=True)


def _created() -> sa.Column[int]:
    return sa.Column("created_at", sa.BigInteger, nullable=False)


def _account_fk(*, index: bool = True) -> sa.Column[str]:
    return sa.Column(
        "account_id",
        sa.String(32),
        sa.ForeignKey("accounts.id", ondelete="CASCADE"),
        nullable=False,
        index=index,
    )


accounts = sa.Table(
    "accounts",
    metadata,
    _id(),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("active", sa.Boolean, nullable=False, default=False),
    sa.Column("is_demo", sa.Boolean, nullable=False, default=False),
    # The instance's own account: it sends activation and password-reset emails.
    sa.Column("is_system", sa.Boolean, nullable=False, default=False, server_default=sa.false()),
    sa.Column("rate_per_second", sa.Integer, nullable=False, default=5),
    sa.Column("daily_limit", sa.Integer, nullable=False, default=10_000),
    sa.Column("max_message_size", sa.Integer, nullable=False, default=10 * 1024 * 1024),
    # ISO date, inclusive last day of the subscription; NULL means it never expires.
    sa.Column("expires_on", sa.String(10), nullable=True),
    _created(),
    # First activation; set and inactive means an operator deactivated it (0004_dashboard).
    sa.Column("activated_at", sa.BigInteger, nullable=True),
)

users = sa.Table(
    "users",
    metadata,
    _id(),
    _account_fk(),
    sa.Column("email", sa.String(320), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(200), nullable=False),
    sa.Column("role", sa.String(20), nullable=False, default="owner"),
    sa.Column("is_operator", sa.Boolean, nullable=False, default=False),
    _created(),
)

apps = sa.Table(
    "apps",
    metadata,
    _id(),
    _account_fk(),
    sa.Column("app_id", sa.String(64), nullable=False, unique=True),
    sa.Column("name", sa.String(200), nullable=False),
    _created(),
    # How many contacts the app has, and how many it has lost (0005_contact_count): every
    # statement that inserts or deletes the app's contacts changes them in its transaction.
    # `total` of GET /v1/contact reads the first; together they say whether a process's
    # cached page positions (contacts._Marks) still describe the app's contacts.
    sa.Column("contact_count", sa.BigInteger, nullable=False, default=0, server_default="0"),
    sa.Column("contacts_deleted", sa.BigInteger, nullable=False, default=0, server_default="0"),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    _id(),
    _account_fk(),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("prefix", sa.String(32), nullable=False, unique=True),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    # Encrypted with the server's secret key: HMAC verification needs the secret itself.
    sa.Column("signing_secret", sa.Text, nullable=True),
    sa.Column("require_signature", sa.Boolean, nullable=False, default=False),
    sa.Column("last_used_at", sa.BigInteger, nullable=True),
    sa.Column("revoked_at", sa.BigInteger, nullable=True),
    _created(),
)

domains = sa.Table(
    "domains",
    metadata,
    _id(),
    _account_fk(),
    sa.Column("name", sa.String(253), nullable=False),
    sa.Column("verified", sa.Boolean, nullable=False, default=False),
    sa.Column("dkim_selector", sa.String(63), nullable=True),
    # Encrypted PEM; never leaves the server except inside a signature.
    sa.Column("dkim_private_key", sa.Text, nullable=True),
    _created(),
    sa.UniqueConstraint("account_id", "name", name="uq_domains_account_name"),
)

senders = sa.Table(
    "senders",
    metadata,
    _id(),
    _account_fk(),
    sa.Column(
        "domain_id", sa.String(32), sa.ForeignKey("domains.id", ondelete="CASCADE"), nullable=False
    ),
    # Lower-cased full address, or "*" for any address of the domain.
    sa.Column("address", sa.String(320), nullable=False),
    _created(),
    sa.UniqueConstraint("domain_id", "address", name="uq_senders_domain_address"),
)

contacts = sa.Table(
    "contacts",
    metadata,
    # An integer key gives the stable creation order that pagination needs.
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column(
        "app_pk", sa.String(32), sa.ForeignKey("apps.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("email", sa.String(320), nullable=False),
    sa.Column("email_lower", sa.String(320), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("language", sa.String(35), nullable=False, default=""),
    sa.Column("first_name", sa.String(200), nullable=False, default=""),
    sa.Column("last_name", sa.String(200), nullable=False, default=""),
    sa.Column("phone_number", sa.String(50), nullable=False, default=""),
    sa.Column("birthday", sa.String(10), nullable=False, default=""),
    sa.Column("company", sa.String(200), nullable=False, default=""),
    sa.Column("vip_level", sa.Integer, nullable=False, default=0),
    sa.Column("amount", sa.String(40), nullable=False, default=""),
    _created(),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("app_pk", "email_lower", name="uq_contacts_app_email"),
    sa.Index("ix_contacts_app_order", "app_pk", "id"),
)

# Messages still to deliver: waiting, deferred, or being sent (a lease that runs out makes
# its message due again). The due index holds these rows only, by next_attempt_at: a claim
# reads its first entries in order, where an index on (status, next_attempt_at) had every
# due row read and sorted for each claim (3.5 ms with 6,000 queued on PostgreSQL), and a
# delivered message leaves the index. Queries repeat this very text (not bound
# parameters): the planners use a partial index only where the query's WHERE clause
# visibly implies the index's.
DUE_STATUSES = ("queued", "deferred", "sending")
DUE_SQL = f"status IN ({', '.join(repr(status) for status in DUE_STATUSES)})"
DUE = sa.text(DUE_SQL)

messages = sa.Table(
    "messages",
    metadata,
    _id(),
    sa.Column("request_id", sa.String(36), nullable=False, index=True),
    # Looked up by account through ix_messages_account_created (its first column): an
    # index of its own only cost every insert and status update one more entry.
    _account_fk(index=False),
    sa.Column("app_pk", sa.String(32), nullable=True),
    sa.Column("from_header", sa.String(400), nullable=False),
    sa.Column("from_addr", sa.String(320), nullable=False),
    sa.Column("to_header", sa.String(400), nullable=False),
    sa.Column("to_addr", sa.String(320), nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    # queued | sending | delivered | deferred | bounced | failed | suppressed
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.BigInteger, nullable=True),
    sa.Column("lease_token", sa.String(32), nullable=True),
    sa.Column("lease_expires_at", sa.BigInteger, nullable=True),
    sa.Column("last_code", sa.Integer, nullable=True),
    sa.Column("last_text", sa.Text, nullable=True),
    _created(),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Index("ix_messages_due", "next_attempt_at", sqlite_where=DUE, postgresql_where=DUE),
    sa.Index("ix_messages_account_created", "account_id", "created_at"),
)

attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column(
        "message_id",
        sa.String(32),
        sa.ForeignKey("messages.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("started_at", sa.BigInteger, nullable=False),
    sa.Column("duration_ms", sa.Integer, nullable=False),
    sa.Column("host", sa.String(300), nullable=True),
    sa.Column("outcome", sa.String(20), nullable=False),
    sa.Column("code", sa.Integer, nullable=True),
    sa.Column("text", sa.Text, nullable=False, default=""),
)

daily_usage = sa.Table(
    "daily_usage",
    metadata,
    sa.Column(
        "account_id",
        sa.String(32),
        sa.ForeignKey("accounts.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("day", sa.String(10), primary_key=True),
    sa.Column("sent", sa.Integer, nullable=False, default=0),
)

suppressions = sa.Table(
    "suppressions",
    metadata,
    _account_fk(),
    sa.Column("email_lower", sa.String(320), nullable=False),
    sa.Column("reason", sa.String(40), nullable=False),
    _created(),
    sa.PrimaryKeyConstraint("account_id", "email_lower", name="pk_suppressions"),
)

inbox = sa.Table(
    "inbox",
    metadata,
    sa.Column(
        "message_id",
        sa.String(32),
        sa.ForeignKey("messages.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    _account_fk(),
    sa.Column("raw", sa.LargeBinary, nullable=False),
    sa.Column("received_at", sa.BigInteger, nullable=False),
)


sessions = sa.Table(
    "sessions",
    metadata,
    # The cookie carries only this random id; a new one is issued at every login.
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column(
        "user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("csrf_token", sa.String(64), nullable=False),
    _created(),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    _account_fk(),
    sa.Column("message_id", sa.String(32), nullable=True, index=True),
    # queued | delivered | deferred | bounced | failed | suppressed | complained | unsubscribed
    sa.Column("type", sa.String(20), nullable=False),
    sa.Column("data", sa.Text, nullable=False, default="{}"),  # JSON
    _created(),
)

webhook_endpoints = sa.Table(
    "webhook_endpoints",
    metadata,
    _id(),
    _account_fk(),
    sa.Column("url", sa.String(2000), nullable=False),
    sa.Column("secret", sa.Text, nullable=False),  # encrypted with the server's key
    sa.Column("events", sa.Text, nullable=False),  # comma-separated event types, or "*"
    sa.Column("enabled", sa.Boolean, nullable=False, default=True),
    sa.Column("disabled_reason", sa.String(200), nullable=True),
    _created(),
)

webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    _id(),
    sa.Column(
        "endpoint_id",
        sa.String(32),
        sa.ForeignKey("webhook_endpoints.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("event_id", sa.BigInteger, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    # pending | sending | delivered | failed
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.BigInteger, nullable=True),
    sa.Column("lease_token", sa.String(32), nullable=True),
    sa.Column("last_status_code", sa.Integer, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    _created(),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
)

webhook_attempts = sa.Table(
    "webhook_attempts",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column(
        "delivery_id",
        sa.String(32),
        sa.ForeignKey("webhook_deliveries.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("started_at", sa.BigInteger, nullable=False),
    sa.Column("duration_ms", sa.Integer, nullable=False),
    sa.Column("status_code", sa.Integer, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("response_excerpt", sa.Text, nullable=True),
)

import_jobs = sa.Table(
    "import_jobs",
    metadata,
    _id(),
    _account_fk(),
    sa.Column(
        "app_pk", sa.String(32), sa.ForeignKey("apps.id", ondelete="CASCADE"), nullable=False
    ),
    # queued | running | done | failed
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("filename", sa.String(300), nullable=False, default=""),
    sa.Column("path", sa.String(1000), nullable=False),  # the uploaded CSV in the data dir
    sa.Column("total_rows", sa.Integer, nullable=False, default=0),
    sa.Column("processed_rows", sa.Integer, nullable=False, default=0),
    sa.Column("created_rows", sa.Integer, nullable=False, default=0),
    sa.Column("updated_rows", sa.Integer, nullable=False, default=0),
    sa.Column("error_rows", sa.Integer, nullable=False, default=0),
    sa.Column("errors", sa.Text, nullable=False, default=""),  # first few row errors
    _created(),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
)


WriteFn = Callable[[AsyncConnection], Awaitable[T]]
_MAX_GROUP = 1000


P = TypeVar("P")
# Handles many callers' payloads with a few set-based statements; returns one result (or
# the SendKitError for that caller) per payload, in order.
BatchFn = Callable[[AsyncConnection, list[P]], Awaitable[list[Any]]]
L = TypeVar("L")


@dataclass(frozen=True)
class ReadThenWrite(Generic[P, L]):
    """A batch handler in two steps. `read` looks things up for the whole batch; `write`
    gets its answer. On SQLite `read` runs on a snapshot taken just before the write
    transaction, outside the writer lock (which every process waits for); so only for
    lookups that may be a moment old: checks repeated later, or harmless when stale."""

    read: Callable[[AsyncConnection, list[P]], Coroutine[Any, Any, L]]
    write: Callable[[AsyncConnection, list[P], L], Coroutine[Any, Any, list[Any]]]


Batch = BatchFn[P] | ReadThenWrite[P, Any]


@dataclass
class _Write(Generic[T]):
    fn: WriteFn[T] | None
    future: asyncio.Future[T]
    savepoint: bool
    batch: Batch[Any] | None = None
    payload: Any = None


class Database:
    """One engine per process. Writes go through `write()` (group commit) or `begin()`."""

    def __init__(
        self,
        url: str,
        *,
        echo: bool = False,
        lock_timeout: float = 5.0,
        cache_seconds: float = 2.0,
        commit_in_loop: bool = False,
        api_first: Literal["announce", "defer"] | None = None,
    ) -> None:
        """`commit_in_loop`: SQLite groups run on the event loop when the writer lock is
        free (`_GroupWriter`); for a process whose loop only serves requests.
        `api_first`: between SQLite processes, an API process announces when it is
        saturated ("announce"), and a delivery process ("defer") then holds back its
        claims (`yield_to_api`) and its writes (`filelock.ApiBusy`)."""
        self.url = url
        # Lookups that every request repeats; writes to what they cache call clear().
        self.cache = TtlCache(cache_seconds)
        self.is_sqlite = url.startswith("sqlite")
        self.engine: AsyncEngine = _create_engine(url, echo=echo, lock_timeout=lock_timeout)
        self._lock_timeout = lock_timeout
        self._pending: list[_Write[Any]] = []
        self._committer: asyncio.Task[None] | None = None
        # SQLite has one writer; queueing for it here is fair and fast, where SQLite's own
        # busy handler sleeps and retries: an asyncio lock within the process, an flock
        # between processes.
        self._sqlite_writer: asyncio.Lock | None = asyncio.Lock() if self.is_sqlite else None
        self._file_lock = _sqlite_file_lock(url, lock_timeout) if self.is_sqlite else None
        busy = self._file_lock.path.with_suffix(".api-busy") if self._file_lock else None
        self._announce = ApiBusy(busy) if busy and api_first == "announce" else None
        self._defer_to = ApiBusy(busy) if busy and api_first == "defer" else None
        self._quiet_check: asyncio.TimerHandle | None = None
        self._gather_turn = commit_in_loop and self.is_sqlite
        # SQLite group commits run whole on one thread of their own (see syncconn.py);
        # an in-memory database has no second connection to the same data, so not there.
        self._group_writer = (
            _GroupWriter(
                url,
                echo=echo,
                lock_timeout=lock_timeout,
                in_loop=commit_in_loop,
                # Its own descriptor: flock probes from two threads on one would mix.
                defer_to=ApiBusy(busy) if busy and self._defer_to else None,
            )
            if self._file_lock is not None
            else None
        )

    @asynccontextmanager
    async def begin(self, *, invalidates: bool = True) -> AsyncIterator[AsyncConnection]:
        """A transaction that commits on success; a locked or full database answers 503.

        The hot paths write through `write()`; everything else (keys, plans, domains,
        senders) comes here, so a commit here also drops the cached lookups, unless the
        caller says it touches nothing they depend on (`invalidates=False`: pollers).
        """
        async with self._transaction() as conn:
            yield conn
        if invalidates:
            self.cache.clear()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        async with self._writer_slot():
            with _unavailable_is_503():
                async with self.engine.begin() as conn:
                    yield conn

    @asynccontextmanager
    async def _writer_slot(self) -> AsyncIterator[None]:
        if self._sqlite_writer is None:
            yield
            return
        async with self._sqlite_writer:
            held = await self._lock_file()
            try:
                yield
            finally:
                if held is not None:
                    held.release()

    async def _lock_file(self) -> WriterLock | None:
        """The lock between processes, now held; None without one."""
        lock = self._file_lock
        if lock is None:
            return None
        try:
            await lock.acquire()
        except OSError as exc:
            self._drop_file_lock(exc)
            return None
        return lock

    def _drop_file_lock(self, exc: OSError) -> None:
        """No lock file, or no flock on its filesystem (read-only or full disk, NFS,
        FUSE): SQLite's own locking still holds, so writes go on without it."""
        log.warning("writer_lock_unavailable", error=str(exc))
        if self._file_lock is not None:
            self._file_lock.close()
            self._file_lock = None

    async def write(self, fn: WriteFn[T], *, savepoint: bool = True) -> T:
        """Run `fn` in a transaction shared with other writers, and return once it is
        committed (group commit: one fsync for many requests, nothing acknowledged early).

        A failing `fn` is rolled back to its savepoint and only its caller sees the error.
        `savepoint=False` saves two statements for an `fn` that raises only before its
        first change.
        """
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        return await self._queue(_Write(fn, future, savepoint))

    async def write_batch(self, handler: Batch[P], payload: P) -> Any:
        """Like `write()`, but every caller of the same `handler` in a group is served by
        one call with all their payloads: the statements per request shrink with load."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        return await self._queue(_Write(None, future, False, handler, payload))

    def _queue(self, item: _Write[T]) -> asyncio.Future[T]:
        """Queue for the next group; start the committer when none runs. It runs in a
        fresh context: it serves every request, not the one that started it (its log
        lines must not carry that request's id)."""
        self._pending.append(item)
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(
                self._commit_groups(), context=contextvars.Context()
            )
        return item.future

    async def _commit_groups(self) -> None:
        if self._gather_turn:
            # A group on the loop holds it: the requests that arrive meanwhile are read
            # after it, so without this turn each group held only what one turn had read
            # (here ~20 of 64 connections). One more turn first gathers the next ones too:
            # the group's fixed cost shrinks per request. Quick intake alone on this
            # machine: 4,298-5,647 -> 6,353-6,987 req/s, p99 21-24 -> 14-17 ms.
            await asyncio.sleep(0)
        while self._pending:
            group, self._pending = self._pending[:_MAX_GROUP], self._pending[_MAX_GROUP:]
            if len(group) >= _BUSY_GROUP:
                self._busy()
            await self._commit_group(group)

    def _busy(self) -> None:
        """A large group: requests arrive faster than they commit one by one, this API
        process is saturated. Delivery processes are told until it has been quiet for
        `_API_QUIET` seconds."""
        if self._announce is None:
            return
        self._announce.announce()
        if self._quiet_check is None:
            self._quiet_check = asyncio.get_running_loop().call_later(
                _API_QUIET, self._withdraw_if_quiet
            )

    def _withdraw_if_quiet(self) -> None:
        self._quiet_check = None
        announce = self._announce
        if announce is None:
            return
        quiet_for = time.monotonic() - announce.last
        if quiet_for >= _API_QUIET:
            announce.withdraw()
        else:
            self._quiet_check = asyncio.get_running_loop().call_later(
                _API_QUIET - quiet_for, self._withdraw_if_quiet
            )

    async def yield_to_api(self, longest: float, stop: asyncio.Event | None = None) -> None:
        """In a delivery process: wait while an API process says it is saturated, for
        `longest` seconds at most, or until `stop` is set (see `filelock.ApiBusy`)."""
        busy = self._defer_to
        if busy is None:
            return
        deadline = time.monotonic() + longest
        # Polled: the state is another process's flock, which nothing here can await.
        while busy.announced() and time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return
            await asyncio.sleep(_YIELD_PAUSE)

    async def _commit_group(self, group: list[_Write[Any]]) -> None:
        try:
            outcomes = await self._transact_group(group)
        except BaseException as exc:  # the commit failed: nothing of this group is stored
            _fail(group, exc)
            if not isinstance(exc, Exception):
                raise
            return
        for item, value, error in outcomes:
            if item.future.done():
                continue
            if error is None:
                item.future.set_result(value)
            else:
                item.future.set_exception(error)

    async def _transact_group(self, group: list[_Write[Any]]) -> list[_Outcome]:
        if self._group_writer is None:
            async with self._transaction() as conn:
                return await _run_group(conn, group)
        lock = self._file_lock
        assert self._sqlite_writer is not None
        async with self._sqlite_writer:
            if lock is not None and lock.usable_from_thread():
                # The writer thread takes the file lock itself, within the lock timeout.
                try:
                    return await self._group_writer.run(group, lock, self._lock_timeout)
                except _NoFileLock as exc:
                    self._drop_file_lock(exc.error)
                    return await self._group_writer.run(group, None, self._lock_timeout)
        async with self._writer_slot():
            return await self._group_writer.run(group, None, self._lock_timeout)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only snapshot; on SQLite it does not take the write lock."""
        async with self.engine.connect() as conn:
            await conn.execution_options(sendkit_readonly=True)
            yield conn

    async def dispose(self) -> None:
        if self._committer is not None:
            await asyncio.gather(self._committer, return_exceptions=True)
        await self.engine.dispose()
        if self._group_writer is not None:
            self._group_writer.close()
        if self._file_lock is not None:
            self._file_lock.close()
        if self._quiet_check is not None:
            self._quiet_check.cancel()
            self._quiet_check = None
        for busy in (self._announce, self._defer_to):
            if busy is not None:
                busy.close()


_Outcome = tuple[_Write[Any], Any, BaseException | None]


def _split(
    group: list[_Write[Any]],
) -> tuple[list[_Write[Any]], dict[Batch[Any], list[_Write[Any]]]]:
    """The group's lone writes, and its batched payloads by handler."""
    alone: list[_Write[Any]] = []
    batches: dict[Batch[Any], list[_Write[Any]]] = {}
    for item in group:
        if item.batch is not None:
            batches.setdefault(item.batch, []).append(item)
        else:
            alone.append(item)
    return alone, batches


async def _run_group(conn: AsyncConnection, group: list[_Write[Any]]) -> list[_Outcome]:
    alone, batches = _split(group)
    outcomes = [await _run_one(conn, item) for item in alone]
    for handler, items in batches.items():
        outcomes.extend(await _run_batch(conn, handler, items))
    return outcomes


def _run_group_now(
    conn: AsyncConnection, group: list[_Write[Any]], looked_up: dict[Batch[Any], Any]
) -> list[_Outcome]:
    """`_run_group` on the writer thread, each write driven to its end on its own, with
    the two-step batches' reads done already (`_read_first`)."""
    alone, batches = _split(group)
    outcomes = [_run_one_now(conn, item) for item in alone]
    for handler, items in batches.items():
        # A batch handler has no savepoint: one that waits on anything else stops the
        # whole group (NotSynchronous), so nothing half-done commits.
        run = _run_batch(conn, handler, items, looked_up.get(handler, _NOT_YET))
        outcomes.extend(run_to_end(run))
    return outcomes


def _read_first(conn: AsyncConnection, group: list[_Write[Any]]) -> dict[Batch[Any], Any]:
    """The reads of the group's two-step batches, on the writer thread."""
    _alone, batches = _split(group)
    return {
        handler: run_to_end(handler.read(conn, [item.payload for item in items]))
        for handler, items in batches.items()
        if isinstance(handler, ReadThenWrite)
    }


def _run_one_now(conn: AsyncConnection, item: _Write[Any]) -> _Outcome:
    try:
        return run_to_end(_run_one(conn, item))
    except NotSynchronous as exc:
        if not item.savepoint:
            raise  # its changes may be half made, and nothing undoes them alone
        return item, None, exc  # its savepoint was rolled back as the coroutine closed


class _GroupWriter:
    """A thread with its own synchronous SQLite connection that runs a whole group
    transaction per hop: the writer lock is held for the statements' time, not for a
    dozen round trips through the event loop.

    `in_loop`: when the writer lock is free at once, the group runs on the event loop's
    thread instead, on a connection of its own that never waits (busy timeout 0). The
    hop to the thread and back, and the two threads taking turns with the GIL while the
    statements run, cost the API process more CPU than the statements themselves (a
    send: 177 -> 138 µs). The loop is held for the group's statements and its fsync,
    about a millisecond for 32 sends; a lock held by another process, or SQLite busy
    with another writer, sends the group to the thread, which waits for it as before.
    Not for a process whose loop also delivers (its SMTP sessions would wait)."""

    def __init__(
        self,
        url: str,
        *,
        echo: bool,
        lock_timeout: float,
        in_loop: bool,
        defer_to: ApiBusy | None = None,
    ) -> None:
        self._defer_to = defer_to
        sync_url = make_url(url).set(drivername="sqlite+pysqlite")
        # Made on the writer thread; disposed of from the loop's thread at the end.
        self.engine = _sync_sqlite_engine(sync_url, echo, busy_timeout=lock_timeout)
        self._loop_engine = _sync_sqlite_engine(sync_url, echo, busy_timeout=0) if in_loop else None
        self._loop_resumes = 0.0  # time.monotonic() from which groups may run on the loop
        self._slow_before = False  # whether the last group on the loop was over budget
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sendkit-sqlite-writer")
        self._checkpointer = _Checkpointer(sync_url.database or "", lock_timeout)

    async def run(
        self, group: list[_Write[Any]], lock: WriterLock | None, lock_wait: float
    ) -> list[_Outcome]:
        """The group's outcomes, once its transaction has ended; the caller holds the
        process's writer lock meanwhile, and the thread takes `lock` (between processes)
        first: if that takes over `lock_wait` seconds, the group fails with 503 and never
        runs. Cancelled midway, it still waits for the thread (the lock must not be
        released under a running transaction), hands back what was really committed,
        and the cancellation comes at the caller's next await."""
        looked_up: dict[Batch[Any], Any] | None = None
        if self._loop_engine is not None and time.monotonic() >= self._loop_resumes:
            deadline = time.monotonic() + _LOOP_LOCK_WAIT
            pause = _LOOP_LOCK_PAUSE
            while True:
                started = time.monotonic()
                try:
                    looked_up, outcomes = self._run_in_loop(
                        self._loop_engine, group, lock, looked_up
                    )
                finally:
                    self._time_on_loop(time.monotonic() - started)
                if outcomes is not None:
                    return outcomes
                if looked_up is None or time.monotonic() + pause > deadline:
                    break
                await asyncio.sleep(pause)
                pause = min(pause * 2, _LOOP_LOCK_PAUSE_MAX)
        loop = asyncio.get_running_loop()
        # The caller's context goes along: log lines keep its fields.
        call = functools.partial(
            contextvars.copy_context().run, self._commit, group, lock, lock_wait, looked_up
        )
        done = loop.run_in_executor(self._thread, call)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            try:
                return await _wait_out(done)
            finally:
                if task is not None:
                    task.cancel()

    def _time_on_loop(self, seconds: float) -> None:
        """Two groups in a row that held the loop past its budget (a slow disk's fsync,
        an inline checkpoint) send the next ones to the thread for a while: every request
        of the process waited meanwhile, not only the group's. One alone does not: the
        first groups of a process open the connection and compile their statements
        (85 ms seen here), and a pause for that sent 10 s of a fresh server's groups to
        the thread (intake 5,300 instead of 8,400 req/s, p99 220 ms)."""
        slow = seconds > _LOOP_BUDGET
        if slow and self._slow_before:
            self._loop_resumes = time.monotonic() + _LOOP_PAUSE
            log.warning("sqlite_group_slow_on_loop", ms=round(seconds * 1000, 1))
        self._slow_before = slow

    def _run_in_loop(
        self,
        engine: sa.Engine,
        group: list[_Write[Any]],
        lock: WriterLock | None,
        looked_up: dict[Batch[Any], Any] | None = None,
    ) -> tuple[dict[Batch[Any], Any] | None, list[_Outcome] | None]:
        """(the reads done, the outcomes), or outcomes None: the lock or SQLite is busy
        now and nothing was written; `run` tries again, then hands the group to the
        thread (neither reads again when the reads are there)."""
        self._checkpointer.start()
        if looked_up is None:
            try:
                with _unavailable_is_503():
                    looked_up = self._read(engine, group)
            except ServiceUnavailable:
                return None, None
        if lock is not None:
            try:
                if not lock.try_hold():
                    return looked_up, None
            except OSError as exc:
                raise _NoFileLock(exc) from exc
        try:
            return looked_up, self._write(engine, group, looked_up)
        except ServiceUnavailable as exc:
            if not _is_busy(exc.__cause__):
                raise
            return looked_up, None  # rolled back whole: the thread waits its turn
        finally:
            if lock is not None:
                lock.release()

    def _commit(
        self,
        group: list[_Write[Any]],
        lock: WriterLock | None,
        lock_wait: float,
        looked_up: dict[Batch[Any], Any] | None = None,
    ) -> list[_Outcome]:
        self._checkpointer.start()
        if looked_up is None:
            with _unavailable_is_503():
                looked_up = self._read(self.engine, group)
        if lock is not None:
            if self._defer_to is not None:
                self._defer_to.defer(_API_FIRST_FOR)
            try:
                held = lock.hold(lock_wait)
            except OSError as exc:
                raise _NoFileLock(exc) from exc
            if not held:
                raise ServiceUnavailable()  # nothing ran: every caller can try again
        try:
            return self._write(self.engine, group, looked_up)
        finally:
            if lock is not None:
                lock.release()

    @staticmethod
    def _write(
        engine: sa.Engine, group: list[_Write[Any]], looked_up: dict[Batch[Any], Any]
    ) -> list[_Outcome]:
        with _unavailable_is_503(), engine.begin() as conn:
            return _run_group_now(SyncBackedConnection(conn).as_async(), group, looked_up)

    @staticmethod
    def _read(engine: sa.Engine, group: list[_Write[Any]]) -> dict[Batch[Any], Any]:
        """Before the writer lock: a read transaction (a snapshot, no lock held)."""
        if not any(isinstance(item.batch, ReadThenWrite) for item in group):
            return {}
        with engine.connect() as conn:
            conn = conn.execution_options(sendkit_readonly=True)
            try:
                return _read_first(SyncBackedConnection(conn).as_async(), group)
            finally:
                conn.rollback()

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        if self._defer_to is not None:
            self._defer_to.close()
        self._checkpointer.stop()
        self.engine.dispose()
        if self._loop_engine is not None:
            self._loop_engine.dispose()


# The longest a delivery process's group waits (seconds) while an API process is
# saturated, before it takes the writer lock anyway: under an endless burst, delivery
# still commits a group every 50 ms or so.
_API_FIRST_FOR = 0.05
# A group this large means an API process is saturated; it says so to delivery processes
# until it has had no such group for `_API_QUIET` seconds.
_BUSY_GROUP = 8
_API_QUIET = 0.1
_YIELD_PAUSE = 0.01

# How long (seconds) a group of an API process retries the writer lock on the loop,
# pausing from the first value up to the second, before its thread waits for it.
_LOOP_LOCK_WAIT = 0.02
_LOOP_LOCK_PAUSE, _LOOP_LOCK_PAUSE_MAX = 0.0002, 0.001

# Two groups in a row on the event loop that take longer than this (seconds) send the
# groups of the next `_LOOP_PAUSE` seconds to the writer thread.
_LOOP_BUDGET = 0.025
_LOOP_PAUSE = 10.0


def _sync_sqlite_engine(url: sa.URL, echo: bool, *, busy_timeout: float) -> sa.Engine:
    engine = sa.create_engine(
        url,
        echo=echo,
        poolclass=sa.pool.StaticPool,
        connect_args={"timeout": busy_timeout, "check_same_thread": False},
    )
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "connect", _checkpoint_in_background)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _is_busy(error: BaseException | None) -> bool:
    """SQLite's answer to a write while another connection writes (SQLITE_BUSY)."""
    text = str(getattr(error, "orig", error)).lower()
    return "locked" in text or "busy" in text


# Pages the group writer's WAL may hold before a commit checkpoints it itself: a
# backstop only, the checkpointer thread keeps it well below.
_INLINE_CHECKPOINT_PAGES = 10_000
_CHECKPOINT_EVERY = 0.25  # seconds


def _checkpoint_in_background(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.execute(f"PRAGMA wal_autocheckpoint={_INLINE_CHECKPOINT_PAGES}")


class _Checkpointer:
    """Copies the WAL back into the database file from a thread of its own. By default
    the commit that passes 1,000 WAL pages does it, inside its transaction: with the
    writer lock held, for every process waiting for it (a few ms every few thousand
    sends, the slowest requests of a burst). A passive checkpoint runs beside writers."""

    def __init__(self, path: str, timeout: float) -> None:
        self._path = path
        self._timeout = timeout
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()

    def start(self) -> None:
        if self._thread is not None:
            return
        with self._guard:
            if self._thread is None and not self._stopping.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="sendkit-sqlite-checkpoint", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        conn = sqlite3.connect(self._path, timeout=self._timeout, isolation_level=None)
        try:
            while not self._stopping.wait(_CHECKPOINT_EVERY):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # the next round tries again
                    log.debug("checkpoint_failed", error=str(exc))
        finally:
            conn.close()

    def stop(self) -> None:
        with self._guard:
            self._stopping.set()
            thread = self._thread
        if thread is not None:
            thread.join()


class _NoFileLock(Exception):
    """flock failed on the lock file before the group ran: it runs again without it."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _fail(group: list[_Write[Any]], error: BaseException) -> None:
    for item in group:
        if not item.future.done():
            item.future.set_exception(error)


async def _wait_out(future: asyncio.Future[T]) -> T:
    """The future's result, however often the waiting task is cancelled meanwhile."""
    while True:
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if future.done():
                return future.result()


_NOT_YET = object()


async def _run_batch(
    conn: AsyncConnection,
    handler: Batch[Any],
    items: list[_Write[Any]],
    looked_up: Any = _NOT_YET,
) -> list[_Outcome]:
    payloads = [item.payload for item in items]
    if isinstance(handler, ReadThenWrite):
        if looked_up is _NOT_YET:
            looked_up = await handler.read(conn, payloads)
        results = await handler.write(conn, payloads, looked_up)
    else:
        results = await handler(conn, payloads)
    return [
        (item, None, r) if isinstance(r, SendKitError) else (item, r, None)
        for item, r in zip(items, results, strict=True)
    ]


async def _run_one(conn: AsyncConnection, item: _Write[Any]) -> _Outcome:
    assert item.fn is not None
    if item.future.cancelled():
        return item, None, None
    if not item.savepoint:
        try:
            return item, await item.fn(conn), None
        except SendKitError as exc:
            return item, None, exc
    try:
        async with conn.begin_nested():
            return item, await item.fn(conn), None
    except Exception as exc:
        if isinstance(exc, DBAPIError) and _is_unavailable(exc):
            raise  # the whole group is lost: every caller must hear it
        return item, None, exc


_UNAVAILABLE = (
    "locked",
    "lock timeout",
    "disk",
    "full",
    "busy",
    "i/o",
    "readonly",
    "no space",
    "connection refused",
    "cannot connect now",
)


@contextmanager
def _unavailable_is_503() -> Iterator[None]:
    """A locked, full or unreachable database, as the 503 every caller can answer."""
    try:
        yield
    except DBAPIError as exc:
        if _is_unavailable(exc):
            raise ServiceUnavailable() from exc
        raise


def _is_unavailable(exc: DBAPIError) -> bool:
    text = str(exc.orig).lower()
    return any(s in text for s in _UNAVAILABLE)


def _sqlite_file_lock(url: str, timeout: float) -> WriterLock | None:
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return WriterLock(Path(database).with_name(Path(database).name + ".writer-lock"), timeout)


def _create_engine(url: str, *, echo: bool, lock_timeout: float) -> AsyncEngine:
    if not url.startswith("sqlite"):
        from sendkit.pgconn import CancellableConnection  # only PostgreSQL needs asyncpg

        # A write stuck behind a lock fails after lock_timeout instead of hanging the API.
        settings = {"lock_timeout": str(int(lock_timeout * 1000))}
        return create_async_engine(
            url,
            echo=echo,
            # Sized for the API's and the worker's concurrency: overflow connections are
            # opened and closed per checkout, which costs more than the query.
            pool_size=20,
            max_overflow=10,
            connect_args={"server_settings": settings, "connection_class": CancellableConnection},
        )
    engine = create_async_engine(
        url,
        echo=echo,
        # Each aiosqlite connection is a thread: keep them rather than open one per burst.
        pool_size=20,
        max_overflow=20,
        connect_args={"timeout": lock_timeout},
    )
    event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
    event.listen(engine.sync_engine, "begin", _sqlite_on_begin)
    event.listen(engine.sync_engine, "invalidate", _sqlite_on_invalidate)
    return engine


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Take transaction control from the driver so BEGIN IMMEDIATE can be issued: a write
    # transaction that starts deferred can deadlock when it later upgrades its lock.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before we answer; acknowledged mail must survive a crash.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_on_invalidate(dbapi_conn: Any, _record: Any, _exception: Any) -> None:
    """Roll back before SQLAlchemy closes a connection it gave up on (a task cancelled
    while aiosqlite's thread ran one of its statements). That statement's cursor lives on
    in the traceback, and SQLite keeps a closed connection with an unfinalised statement
    open, its transaction and the write lock with it, until the cursor is collected:
    seconds in which every other write waited out its busy timeout and answered 503. The
    rollback is queued behind the running statement on the connection's own thread."""
    if dbapi_conn is None:
        return
    try:
        dbapi_conn.rollback()
    except Exception:  # already closed, or not called from a greenlet (garbage collection)
        log.debug("sqlite_invalidated_rollback_failed", exc_info=True)


def _sqlite_on_begin(conn: Any) -> None:
    readonly = conn.get_execution_options().get("sendkit_readonly", False)
    conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")
