"""One-click unsubscribe (RFC 8058) for messages sent to a contact of an app.

A token names a contact and carries an HMAC over (purpose, account, app, contact) made with
the server's secret, so it cannot be forged or moved to another contact:

    <contact id>-<26 base32 chars: the first 128 bits of the HMAC>

It is lower-case and short on purpose: it also travels in the local part of the mailto
address (`unsubscribe+<token>@<return path domain>`), which is limited to 64 characters
and whose case some mail systems do not keep.
"""

from __future__ import annotations

import base64
import hmac
import re
from collections.abc import Collection
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from sendkit import events
from sendkit.config import Settings
from sendkit.contacts import Status
from sendkit.crypto import SecretBox
from sendkit.db import Database, apps, contacts, now_ms
from sendkit.errors import NotFound
from sendkit.prepared import Prepared, json_rows, rows_param

PURPOSE = "unsubscribe"
MAILTO_PREFIX = "unsubscribe+"
_TOKEN = re.compile(r"^([1-9][0-9]{0,17})-([a-z2-7]{26})$")


@dataclass(frozen=True)
class Target:
    contact_id: int
    email: str
    status: str
    app_pk: str
    app_id: str
    app_name: str
    account_id: str


def make_token(box: SecretBox, account_id: str, app_pk: str, contact_id: int) -> str:
    return f"{contact_id}-{_short_mac(box, account_id, app_pk, contact_id)}"


def _short_mac(box: SecretBox, account_id: str, app_pk: str, contact_id: int) -> str:
    full = box.mac(PURPOSE, account_id, app_pk, str(contact_id))
    raw = base64.urlsafe_b64decode(full + "=" * (-len(full) % 4))
    return base64.b32encode(raw[:16]).decode().rstrip("=").lower()


def headers(
    settings: Settings,
    box: SecretBox,
    *,
    account_id: str,
    app_pk: str,
    contact_id: int,
    from_domain: str,
) -> tuple[tuple[str, str], ...]:
    """`List-Unsubscribe` (HTTPS URL and mailto) and `List-Unsubscribe-Post` (RFC 8058)."""
    token = make_token(box, account_id, app_pk, contact_id)
    url = f"{settings.public_url()}/u/{token}"
    mailto = (
        f"mailto:{MAILTO_PREFIX}{token}@{settings.return_path_subdomain}.{from_domain}"
        "?subject=unsubscribe"
    )
    return (
        ("List-Unsubscribe", f"<{url}>, <{mailto}>"),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    )


def token_from_local_part(local_part: str) -> str | None:
    if not local_part.lower().startswith(MAILTO_PREFIX):
        return None
    return local_part[len(MAILTO_PREFIX) :].lower()


async def resolve(conn: AsyncConnection, box: SecretBox, token: str) -> Target | None:
    """The contact a genuine token names; None for anything forged, tampered or stale (the
    contact was deleted)."""
    match = _TOKEN.match(token)
    if match is None:
        return None
    contact_id = int(match[1])
    row = (
        await conn.execute(
            sa.select(
                contacts.c.id,
                contacts.c.email,
                contacts.c.status,
                contacts.c.app_pk,
                apps.c.app_id,
                apps.c.name,
                apps.c.account_id,
            )
            .join(apps, apps.c.id == contacts.c.app_pk)
            .where(contacts.c.id == contact_id)
        )
    ).first()
    if row is None:
        return None
    expected = _short_mac(box, row.account_id, row.app_pk, contact_id)
    if not hmac.compare_digest(expected, match[2]):
        return None
    return Target(
        contact_id, row.email, row.status, row.app_pk, row.app_id, row.name, row.account_id
    )


async def find(db: Database, box: SecretBox, token: str) -> Target:
    """For the confirmation page: looks, changes nothing."""
    async with db.read() as conn:
        target = await resolve(conn, box, token)
    if target is None:
        raise NotFound("This unsubscribe link is not valid")
    return target


async def unsubscribe(db: Database, box: SecretBox, token: str, *, via: str) -> Target:
    """Set the contact to `Unsubscribed`; idempotent, one `unsubscribed` event the first
    time. `via` says how (`one-click`, `mailto`) for the event's data."""
    async with db.begin() as conn:
        target = await resolve(conn, box, token)
        if target is None:
            raise NotFound("This unsubscribe link is not valid")
        if target.status != Status.UNSUBSCRIBED.value:
            await conn.execute(
                contacts.update()
                .where(contacts.c.id == target.contact_id)
                .values(status=Status.UNSUBSCRIBED.value, updated_at=now_ms())
            )
            await events.record(
                conn,
                target.account_id,
                None,
                events.EventType.UNSUBSCRIBED,
                {"email": target.email.lower(), "appId": target.app_id, "via": via},
            )
    return target


@dataclass(frozen=True)
class Membership:
    contact_id: int
    status: str


_MEMBERSHIP = sa.select(contacts.c.id, contacts.c.status).where(
    contacts.c.app_pk == sa.bindparam("app_pk", type_=sa.String),
    contacts.c.email_lower == sa.bindparam("email", type_=sa.String),
)
_MEMBERSHIPS = Prepared(
    lambda dialect: sa.select(
        contacts.c.app_pk, contacts.c.email_lower, contacts.c.id, contacts.c.status
    ).where(sa.tuple_(contacts.c.app_pk, contacts.c.email_lower).in_(json_rows(dialect, 2)))
)


async def membership(db: Database, app_pk: str, email: str) -> Membership | None:
    """The recipient's contact in the message's app, if there is one."""
    async with db.read() as conn:
        row = (await conn.execute(_MEMBERSHIP, {"app_pk": app_pk, "email": email.lower()})).first()
    return None if row is None else Membership(row.id, row.status)


async def memberships(
    conn: AsyncConnection, recipients: Collection[tuple[str, str]]
) -> dict[tuple[str, str], Membership]:
    """`membership` for a worker's batch of (app_pk, email): one query. Keys are
    (app_pk, lower-cased email); recipients without a contact are missing."""
    pairs = sorted({(app_pk, email.lower()) for app_pk, email in recipients})
    if not pairs:
        return {}
    rows = await _MEMBERSHIPS.execute(conn, rows_param(pairs))
    return {(r.app_pk, r.email_lower): Membership(r.id, r.status) for r in rows}
