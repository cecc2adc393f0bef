"""Reading the message log: search, one message with its parts and attempts, the sandbox
inbox, and usage per day. Writes stay in `messages` and `delivery`.

Every query is scoped by a `Viewer`: the messages of one account, plus (for the sandbox
inbox) the system emails addressed to the signed-in user, such as their activation link.
"""

from __future__ import annotations

import datetime as dt
import email
import re
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from typing import Any

import sqlalchemy as sa

from sendkit import mime
from sendkit.db import Database, attempts, daily_usage, inbox, messages
from sendkit.errors import NotFound

STATUSES = ("queued", "sending", "delivered", "deferred", "bounced", "failed", "suppressed")
DAY_MS = 86_400_000
_HEX_ID = re.compile(r"^[0-9a-f]{32}$")
_REQUEST_ID = re.compile(r"^[0-9a-fA-F-]{36}$")


@dataclass(frozen=True)
class Viewer:
    """Whose messages a query may see."""

    account_id: str
    email: str | None = None  # the signed-in user's address ...
    system_account_id: str | None = None  # ... for system emails sent to it
    all_system_mail: bool = False  # instance operators read every system email

    def condition(self, account_column: Any, to_column: Any) -> Any:
        own = account_column == self.account_id
        if self.system_account_id is None:
            return own
        if self.all_system_mail:
            return sa.or_(own, account_column == self.system_account_id)
        if self.email is None:
            return own
        mine = sa.and_(account_column == self.system_account_id, to_column == self.email)
        return sa.or_(own, mine)


@dataclass(frozen=True)
class LogFilter:
    status: str | None = None
    since: dt.date | None = None  # first UTC day, inclusive
    until: dt.date | None = None  # last UTC day, inclusive
    q: str | None = None  # an address (or part of one), a message id or a requestId
    page: int = 1
    page_size: int = 50


@dataclass(frozen=True)
class LogPage:
    items: list[dict[str, Any]]
    page: int
    page_size: int
    has_next: bool


_LIST_COLUMNS = [
    messages.c.id,
    messages.c.request_id,
    messages.c.from_header,
    messages.c.to_header,
    messages.c.subject,
    messages.c.status,
    messages.c.attempts,
    messages.c.created_at,
    messages.c.updated_at,
    messages.c.last_code,
]


def _day_start(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() * 1000)


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _search_condition(q: str) -> Any:
    text = q.strip()
    if _HEX_ID.match(text.lower()):
        return messages.c.id == text.lower()
    if _REQUEST_ID.match(text):
        return messages.c.request_id == text.lower()
    pattern = _like(text.lower())
    return sa.or_(
        messages.c.to_addr.like(pattern, escape="\\"),
        messages.c.from_addr.like(pattern, escape="\\"),
    )


def _filters(account_id: str, f: LogFilter) -> list[Any]:
    where: list[Any] = [messages.c.account_id == account_id]
    if f.status:
        where.append(messages.c.status == f.status)
    if f.since:
        where.append(messages.c.created_at >= _day_start(f.since))
    if f.until:
        where.append(messages.c.created_at < _day_start(f.until) + DAY_MS)
    if f.q and f.q.strip():
        where.append(_search_condition(f.q))
    return where


async def search(db: Database, account_id: str, f: LogFilter) -> LogPage:
    """One page of an account's messages, newest first."""
    query = (
        sa.select(*_LIST_COLUMNS)
        .where(*_filters(account_id, f))
        .order_by(messages.c.created_at.desc(), messages.c.id.desc())
        .limit(f.page_size + 1)
        .offset((f.page - 1) * f.page_size)
    )
    async with db.read() as conn:
        rows = [dict(r._mapping) for r in await conn.execute(query)]
    return LogPage(rows[: f.page_size], f.page, f.page_size, len(rows) > f.page_size)


# --- one message ------------------------------------------------------------------------


@dataclass
class MessageView:
    """A message as the dashboard shows it: the row, the attempts and the parsed source."""

    row: dict[str, Any]
    attempts: list[dict[str, Any]]
    raw: bytes
    delivered_copy: bool  # True: the sandbox's copy; False: rebuilt (unsigned) from the log
    headers: list[tuple[str, str]] = field(default_factory=list)
    html: str | None = None
    text: str | None = None


async def get(db: Database, viewer: Viewer, message_id: str) -> MessageView:
    """One message the viewer may see; any other id answers NotFound, the same way."""
    query = sa.select(messages).where(
        sa.or_(messages.c.id == message_id, messages.c.request_id == message_id),
        viewer.condition(messages.c.account_id, messages.c.to_addr),
    )
    async with db.read() as conn:
        row = (await conn.execute(query.limit(1))).first()
        if row is None:
            raise NotFound("Message not found")
        tries = await conn.execute(
            sa.select(attempts).where(attempts.c.message_id == row.id).order_by(attempts.c.id)
        )
        raw = await conn.scalar(sa.select(inbox.c.raw).where(inbox.c.message_id == row.id))
    data = dict(row._mapping)
    for private in ("lease_token", "lease_expires_at"):
        data.pop(private, None)
    view = MessageView(
        data, [dict(t._mapping) for t in tries], bytes(raw or b""), delivered_copy=raw is not None
    )
    if raw is None:
        view.raw = _rebuild(data)
    _parse_into(view)
    return view


def _rebuild(row: dict[str, Any]) -> bytes:
    """The message as the worker builds it (before DKIM): what was, or will be, sent."""
    try:
        return mime.build(
            mime.OutgoingMessage(
                message_id=row["id"],
                from_header=row["from_header"],
                to_header=row["to_header"],
                subject=row["subject"],
                body=row["body"],
                created_at=dt.datetime.fromtimestamp(row["created_at"] / 1000, dt.UTC),
            )
        )
    except ValueError:
        return str(row["body"]).encode("utf-8", "replace")


def _parse_into(view: MessageView) -> None:
    parsed = email.message_from_bytes(view.raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    view.headers = [(name, str(value)) for name, value in parsed.items()]
    view.html = _part(parsed, "html")
    view.text = _part(parsed, "plain")
    if view.html is None and view.text is None:
        view.text = view.row["body"]


def _part(message: EmailMessage, subtype: str) -> str | None:
    try:
        part = message.get_body(preferencelist=(subtype,))
        if part is None or part.get_content_subtype() != subtype:
            return None
        content = part.get_content()
    except (LookupError, ValueError, AssertionError):
        return None
    return content if isinstance(content, str) else None


# --- the sandbox inbox ------------------------------------------------------------------


async def inbox_page(db: Database, viewer: Viewer, page: int, page_size: int = 50) -> LogPage:
    """Messages the sandbox transport kept for this viewer, newest first."""
    query = (
        sa.select(
            messages.c.id,
            messages.c.from_header,
            messages.c.to_header,
            messages.c.subject,
            messages.c.status,
            inbox.c.received_at,
            (inbox.c.account_id != viewer.account_id).label("from_system"),
        )
        .select_from(inbox.join(messages, messages.c.id == inbox.c.message_id))
        .where(viewer.condition(inbox.c.account_id, messages.c.to_addr))
        .order_by(inbox.c.received_at.desc(), messages.c.id.desc())
        .limit(page_size + 1)
        .offset((page - 1) * page_size)
    )
    async with db.read() as conn:
        rows = [dict(r._mapping) for r in await conn.execute(query)]
    return LogPage(rows[:page_size], page, page_size, len(rows) > page_size)


# --- usage ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DayUsage:
    day: dt.date
    sent: int
    delivered: int
    deferred: int
    bounced: int


async def daily(db: Database, account_id: str, today: dt.date, days: int = 30) -> list[DayUsage]:
    """Per UTC day, oldest first: messages accepted (what the daily limit counts), and
    delivery attempts that delivered, deferred, or bounced (permanent failures)."""
    first = today - dt.timedelta(days=days - 1)
    start = _day_start(first)
    sent_query = sa.select(daily_usage.c.day, daily_usage.c.sent).where(
        daily_usage.c.account_id == account_id, daily_usage.c.day >= first.isoformat()
    )
    day_index = (attempts.c.started_at // DAY_MS).label("day_index")
    outcome_query = (
        sa.select(day_index, attempts.c.outcome, sa.func.count())
        .select_from(attempts.join(messages, messages.c.id == attempts.c.message_id))
        .where(messages.c.account_id == account_id, attempts.c.started_at >= start)
        .group_by(day_index, attempts.c.outcome)
    )
    async with db.read() as conn:
        sent = {row.day: int(row.sent) for row in await conn.execute(sent_query)}
        outcomes: dict[tuple[int, str], int] = {
            (int(i), outcome): int(n) for i, outcome, n in await conn.execute(outcome_query)
        }
    result = []
    for offset in range(days):
        day = first + dt.timedelta(days=offset)
        index = _day_start(day) // DAY_MS

        def count(*kinds: str, index: int = index) -> int:
            return sum(outcomes.get((index, k), 0) for k in kinds)

        result.append(
            DayUsage(
                day,
                sent.get(day.isoformat(), 0),
                count("delivered"),
                count("deferred"),
                count("bounced", "failed"),
            )
        )
    return result
