"""Contacts of an app: the create-or-update rules, listing and deletion.

The API's own rules, as documented:
- `appId`, `emailAddress` and `status` take effect on create only; an update merges `data`.
- addresses match case-insensitively; `data` keys are the documented ones and no others.
"""

from __future__ import annotations

import datetime as dt
import re
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Annotated, Any, TypeVar

import sqlalchemy as sa
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from sendkit import apps
from sendkit.addresses import parse_mailbox
from sendkit.db import Database, contacts, now_ms
from sendkit.errors import NotFound

T = TypeVar("T")

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 500


class Status(StrEnum):
    CONFIRMED = "Confirmed"
    UNSUBSCRIBED = "Unsubscribed"


# API name -> column, for the documented `data` fields.
DATA_FIELDS = {
    "language": "language",
    "firstName": "first_name",
    "lastName": "last_name",
    "phoneNumber": "phone_number",
    "birthday": "birthday",
    "company": "company",
    "vipLevel": "vip_level",
    "amount": "amount",
}
_EMPTY = {column: ("" if column != "vip_level" else 0) for column in DATA_FIELDS.values()}
_AMOUNT = re.compile(r"^-?\d{1,30}(\.\d{1,10})?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _int_as_str(value: Any) -> Any:
    # JSON clients send the documented numeric-looking appId as a number as often as not.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


AppId = Annotated[str, BeforeValidator(_int_as_str), Field(min_length=1, max_length=64)]


def _text(limit: int) -> Any:
    return Field(default=None, max_length=limit)


class ContactData(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    language: str | None = _text(35)
    firstName: str | None = _text(200)
    lastName: str | None = _text(200)
    phoneNumber: str | None = _text(50)
    birthday: str | None = None
    company: str | None = _text(200)
    vipLevel: int | None = Field(default=None, ge=0, le=1_000_000)
    amount: str | None = None

    @field_validator("language", "firstName", "lastName", "phoneNumber", "company")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and _CONTROL.search(value):
            raise ValueError("must not contain control characters")
        return value

    @field_validator("birthday", mode="before")
    @classmethod
    def _birthday(cls, value: Any) -> str | None:
        if value is None or value == "":
            return value  # type: ignore[no-any-return]
        if not isinstance(value, str):
            raise ValueError("must be a date as DD/MM or YYYY-MM-DD")
        return parse_birthday(value.strip())

    @field_validator("vipLevel", mode="before")
    @classmethod
    def _vip(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be a whole number")
        if isinstance(value, str):
            if not value.strip().isdigit():
                raise ValueError("must be a whole number")
            return int(value.strip())
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("must be a whole number")
        return value

    @field_validator("amount", mode="before")
    @classmethod
    def _amount(cls, value: Any) -> str | None:
        if value is None or value == "":
            return value  # type: ignore[no-any-return]
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError("must be a decimal number such as 100.00")
        # A JSON number like 1e21 reads as a float; written out in full, not in exponent form.
        text = value.strip() if isinstance(value, str) else _plain_number(value)
        try:
            Decimal(text)
        except InvalidOperation:
            raise ValueError("must be a decimal number such as 100.00") from None
        if not _AMOUNT.match(text):
            raise ValueError("must be a decimal number such as 100.00")
        return text


def _plain_number(value: int | float) -> str:
    if isinstance(value, float) and not value.is_integer():
        return format(Decimal(repr(value)), "f")
    return str(int(value)) if isinstance(value, float) else str(value)


def parse_birthday(value: str) -> str:
    """`DD/MM` (documented) or `YYYY-MM-DD` (the documented example); a real date."""
    try:
        if re.fullmatch(r"\d{1,2}/\d{1,2}", value):
            day, month = (int(p) for p in value.split("/"))
            dt.date(2000, month, day)  # a leap year, so 29/02 is a real birthday
            return f"{day:02d}/{month:02d}"
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise ValueError("is not a real date") from None
    raise ValueError("must be a date as DD/MM or YYYY-MM-DD")


class SaveContact(BaseModel):
    model_config = ConfigDict(extra="forbid")

    appId: AppId
    emailAddress: str = Field(min_length=3, max_length=320)
    status: Status
    data: ContactData | None = None

    @field_validator("emailAddress")
    @classmethod
    def _email(cls, value: str) -> str:
        return parse_mailbox(value).address if "<" not in value else _reject_named(value)


def _reject_named(_value: str) -> str:
    raise ValueError("must be a bare email address")


class ContactQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    appId: AppId
    page: int = Field(default=1, ge=1, le=10_000_000)
    pageSize: int = Field(default=DEFAULT_PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE)


class ContactKey(BaseModel):
    model_config = ConfigDict(extra="ignore")

    appId: AppId
    emailAddress: str = Field(min_length=1, max_length=320)


def _data_values(data: ContactData | None) -> dict[str, Any]:
    if data is None:
        return {}
    values = {}
    for name in data.model_fields_set:  # what the request gave: model_dump(exclude_unset)
        column, value = DATA_FIELDS[name], getattr(data, name)
        values[column] = _EMPTY[column] if value is None else value
    return values


async def save(db: Database, account_id: str, request: SaveContact) -> bool:
    """Create the contact, or merge `data` into the existing one. True when created."""
    values = _data_values(request.data)
    now = now_ms()
    async with db.begin() as conn:
        app = await apps.resolve(conn, account_id, request.appId)
        key = (contacts.c.app_pk == app.pk, contacts.c.email_lower == request.emailAddress.lower())
        existing = await conn.scalar(sa.select(contacts.c.id).where(*key))
        if existing is not None:
            await conn.execute(
                contacts.update().where(contacts.c.id == existing).values(updated_at=now, **values)
            )
            return False
        try:
            async with conn.begin_nested():
                await conn.execute(
                    contacts.insert().values(
                        app_pk=app.pk,
                        email=request.emailAddress,
                        email_lower=request.emailAddress.lower(),
                        status=request.status.value,
                        created_at=now,
                        updated_at=now,
                        **(_EMPTY | values),
                    )
                )
        except IntegrityError:
            # Created concurrently by another request: that one wins, ours merges.
            await conn.execute(contacts.update().where(*key).values(updated_at=now, **values))
            return False
        await apps.contacts_changed(conn, app.pk, added=1)
    return True


_LIST_COLUMNS = [
    contacts.c.email,
    contacts.c.status,
    *(contacts.c[c] for c in DATA_FIELDS.values()),
]
_API_NAMES = ("emailAddress", "status", *DATA_FIELDS)  # in the order of _LIST_COLUMNS


def to_api(row: Any) -> dict[str, Any]:
    """The API's item for a row that ends with `_LIST_COLUMNS` (a page of 500 is built in
    well under a millisecond this way; by attribute names it took several)."""
    return dict(zip(_API_NAMES, row[-len(_API_NAMES) :], strict=True))


async def list_page(db: Database, account_id: str, query: ContactQuery) -> dict[str, Any]:
    async with _snapshot(db) as conn:
        app = await apps.resolve(conn, account_id, query.appId)
        items = await _page(db, conn, app, _LIST_COLUMNS, query.page, query.pageSize, to_api)
    return {
        "total": app.contact_count,
        "page": query.page,
        "pageSize": query.pageSize,
        "list": items,
    }


async def delete(db: Database, account_id: str, key: ContactKey) -> None:
    async with db.begin() as conn:
        app = await apps.resolve(conn, account_id, key.appId)
        result = await conn.execute(
            contacts.delete().where(
                contacts.c.app_pk == app.pk,
                contacts.c.email_lower == key.emailAddress.strip().lower(),
            )
        )
        if result.rowcount == 0:
            raise NotFound("Bad request parameters: contact not found for 'emailAddress'")
        await apps.contacts_changed(conn, app.pk, removed=result.rowcount)


# --- pages without big OFFSETs ----------------------------------------------------------
#
# A page is the app's contacts in id (creation) order from position (page-1)*pageSize.
# `OFFSET` walks every contact before that position (90 ms for the last of 2,000 pages of
# 500 on SQLite), so each process keeps, per app, the id at every `_MARK_EVERY`-th
# position (`_Marks`) and starts the page at the nearest one: `id >= mark` with an
# `OFFSET` below `_MARK_EVERY`. The result is the same as the plain `OFFSET`.
#
# The marks describe the app's contacts as of (`apps.contact_count`,
# `apps.contacts_deleted`); every insert and delete changes that pair in its own
# transaction (`apps.contacts_changed`), so another process's change is seen at the next
# request. Marks are rebuilt in one statement after a deletion (for a million contacts:
# ~0.1 s on SQLite, ~0.3 s on PostgreSQL before the table is vacuumed), and extended by
# the new tail (a few ms) when contacts were only appended since. Pages within the first
# `_MARK_EVERY` contacts need no marks.

_MARK_EVERY = 1000
_MARKED_APPS = 16  # apps whose marks a process keeps (1,000 ints per million contacts)


@dataclass(frozen=True)
class _Marks:
    count: int  # the app's contact_count and contacts_deleted these marks describe
    deleted: int
    ids: list[int]  # ids[j] is the id at position j * _MARK_EVERY
    last: int | None  # the largest id

    def fit(self, app: apps.App) -> bool:
        return self.count == app.contact_count and self.deleted == app.contacts_deleted


_marks: weakref.WeakKeyDictionary[Database, OrderedDict[str, _Marks]] = weakref.WeakKeyDictionary()

# The id at every _MARK_EVERY-th position from :start (inclusive), each found by skipping
# _MARK_EVERY entries of the (app_pk, id) index from the previous one.
_WALK = sa.text(
    "WITH RECURSIVE marks(id) AS ("
    " SELECT CAST(:start AS BIGINT)"
    " UNION ALL"
    " SELECT (SELECT c.id FROM contacts AS c WHERE c.app_pk = :app AND c.id >= marks.id"
    " ORDER BY c.id LIMIT 1 OFFSET :step)"
    " FROM marks WHERE marks.id IS NOT NULL"
    ") SELECT id FROM marks WHERE id IS NOT NULL"
)


@asynccontextmanager
async def _snapshot(db: Database) -> AsyncIterator[AsyncConnection]:
    """A read whose statements all see one snapshot, so the app's count and the page
    agree (SQLite's read transactions already do; PostgreSQL's default does not)."""
    async with db.read() as conn:
        if not db.is_sqlite:
            await conn.execution_options(isolation_level="REPEATABLE READ")
            # These reads walk the (app_pk, id) index in order and stop early. Without
            # statistics (a fresh import, autovacuum off or behind) PostgreSQL estimates a
            # few hundred contacts per app and prefers a bitmap scan that reads every
            # contact of the app and sorts them: 0.5 s for a page, minutes for the marks.
            await conn.execute(sa.text("SET LOCAL enable_bitmapscan = off"))
        yield conn


async def _page(
    db: Database,
    conn: AsyncConnection,
    app: apps.App,
    columns: list[Any],
    page: int,
    size: int,
    item: Callable[[Any], T],
) -> list[T]:
    """`item(row)` for rows `(page-1)*size` onwards of the app's contacts in id order
    (read with `app`). Each row is converted as it is fetched, so the page's rows are not
    all alive at once (fewer objects reach the garbage collector's oldest generation,
    whose passes, ~0.1 s, are the slowest requests)."""
    offset = (page - 1) * size
    if offset >= app.contact_count:
        return []
    where = [contacts.c.app_pk == app.pk]
    if offset >= _MARK_EVERY:
        marks = await _marks_of(db, conn, app)
        if offset // _MARK_EVERY >= len(marks.ids):  # only if the count were wrong
            return []
        where.append(contacts.c.id >= marks.ids[offset // _MARK_EVERY])
        offset %= _MARK_EVERY
    rows = await conn.execute(
        sa.select(*columns).where(*where).order_by(contacts.c.id).limit(size).offset(offset)
    )
    return [item(row) for row in rows]


async def _marks_of(db: Database, conn: AsyncConnection, app: apps.App) -> _Marks:
    cache = _marks.setdefault(db, OrderedDict())
    marks = cache.get(app.pk)
    if marks is None or not marks.fit(app):
        built = await _build_marks(conn, app, marks)
        current = cache.get(app.pk)  # another request may have built newer ones meanwhile
        if current is None or current.count + current.deleted <= built.count + built.deleted:
            cache[app.pk] = built
        marks = built
    if app.pk in cache:
        cache.move_to_end(app.pk)
    while len(cache) > _MARKED_APPS:
        cache.popitem(last=False)
    return marks


async def _build_marks(conn: AsyncConnection, app: apps.App, old: _Marks | None) -> _Marks:
    """The marks of `app` as read; from `old` when contacts were only appended since."""
    mine = contacts.c.app_pk == app.pk
    if (
        old is not None
        and old.ids
        and old.last is not None
        and old.deleted == app.contacts_deleted
        and old.count < app.contact_count
    ):
        # No deletion since; if every insertion has an id above the old last one (ids
        # from another process's transaction could commit out of order), the old marks
        # keep their positions and only the tail is walked again.
        added, last = (
            await conn.execute(
                sa.select(sa.func.count(), sa.func.max(contacts.c.id)).where(
                    mine, contacts.c.id > old.last
                )
            )
        ).one()
        if added == app.contact_count - old.count:
            tail = await conn.scalars(
                _WALK, {"start": old.ids[-1], "app": app.pk, "step": _MARK_EVERY}
            )
            return _Marks(app.contact_count, app.contacts_deleted, old.ids[:-1] + list(tail), last)
    first = await conn.scalar(sa.select(contacts.c.id).where(mine).order_by(contacts.c.id).limit(1))
    if first is None:
        return _Marks(app.contact_count, app.contacts_deleted, [], None)
    ids = list(await conn.scalars(_WALK, {"start": first, "app": app.pk, "step": _MARK_EVERY}))
    last = await conn.scalar(
        sa.select(contacts.c.id).where(mine).order_by(contacts.c.id.desc()).limit(1)
    )
    return _Marks(app.contact_count, app.contacts_deleted, ids, last)


# --- the dashboard's views of an app's contacts -----------------------------------------


class ContactSearch(BaseModel):
    """Filters of the dashboard's contact table."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    q: str = Field(default="", max_length=320)  # part of the address or of the name
    status: Status | None = None
    page: int = Field(default=1, ge=1, le=10_000_000)
    pageSize: int = Field(default=50, ge=1, le=MAX_PAGE_SIZE)


def _escape_like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _search_item(row: Any) -> dict[str, Any]:
    return to_api(row) | {"id": row.id, "updatedAt": row.updated_at}


def _search_where(app_pk: str, search: ContactSearch) -> list[Any]:
    where: list[Any] = [contacts.c.app_pk == app_pk]
    if search.status is not None:
        where.append(contacts.c.status == search.status.value)
    if search.q:
        pattern = _escape_like(search.q.lower())
        full_name = sa.func.lower(contacts.c.first_name + " " + contacts.c.last_name)
        where.append(
            sa.or_(
                contacts.c.email_lower.like(pattern, escape="\\"),
                full_name.like(pattern, escape="\\"),
                sa.func.lower(contacts.c.last_name).like(pattern, escape="\\"),
            )
        )
    return where


async def search(
    db: Database, account_id: str, app_id: str, search: ContactSearch
) -> dict[str, Any]:
    """A page of matching contacts in creation order, each with its `id`; `total` counts
    the matches and `appTotal` the app's contacts."""
    columns = [contacts.c.id, contacts.c.updated_at, *_LIST_COLUMNS]
    async with _snapshot(db) as conn:
        app = await apps.resolve(conn, account_id, app_id)
        if search.q or search.status is not None:
            where = _search_where(app.pk, search)
            total = await conn.scalar(
                sa.select(sa.func.count()).select_from(contacts).where(*where)
            )
            rows = await conn.execute(
                sa.select(*columns)
                .where(*where)
                .order_by(contacts.c.id)
                .limit(search.pageSize)
                .offset((search.page - 1) * search.pageSize)
            )
            items = [_search_item(r) for r in rows]
        else:
            total = app.contact_count
            items = await _page(db, conn, app, columns, search.page, search.pageSize, _search_item)
    return {
        "total": total or 0,
        "appTotal": app.contact_count,
        "page": search.page,
        "pageSize": search.pageSize,
        "list": items,
    }


async def get_by_id(db: Database, account_id: str, app_id: str, contact_id: int) -> dict[str, Any]:
    """One contact of one of the account's apps; any other id answers NotFound."""
    async with db.read() as conn:
        app = await apps.resolve(conn, account_id, app_id)
        row = (
            await conn.execute(
                sa.select(
                    contacts.c.id, contacts.c.created_at, contacts.c.updated_at, *_LIST_COLUMNS
                ).where(contacts.c.app_pk == app.pk, contacts.c.id == contact_id)
            )
        ).first()
    if row is None:
        raise NotFound("Contact not found")
    return to_api(row) | {"id": row.id, "createdAt": row.created_at, "updatedAt": row.updated_at}


async def set_status(
    db: Database, account_id: str, app_id: str, email_address: str, status: Status
) -> None:
    """Unsubscribe or resubscribe a contact (the API sets status on create only)."""
    async with db.begin() as conn:
        app = await apps.resolve(conn, account_id, app_id)
        result = await conn.execute(
            contacts.update()
            .where(
                contacts.c.app_pk == app.pk,
                contacts.c.email_lower == email_address.strip().lower(),
            )
            .values(status=status.value, updated_at=now_ms())
        )
        if result.rowcount == 0:
            raise NotFound("Bad request parameters: contact not found for 'emailAddress'")
