"""Applications: the `appId` that contact lists belong to."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from sendkit.accounts import new_id
from sendkit.db import Database, accounts, apps, now_ms
from sendkit.errors import BadRequest, NotFound


@dataclass(frozen=True)
class App:
    pk: str
    app_id: str
    name: str
    created_at: int
    # As read with the app (same snapshot): see `contacts_changed`.
    contact_count: int = 0
    contacts_deleted: int = 0


async def create(db: Database, account_id: str, name: str) -> App:
    if not name.strip():
        raise BadRequest("Bad request parameters: 'name' is required")
    # Digits only, like the documented example, and long enough not to be guessed.
    app = App(new_id(), str(secrets.randbelow(9 * 10**15) + 10**15), name.strip(), now_ms())
    async with db.begin() as conn:
        if await conn.scalar(sa.select(accounts.c.id).where(accounts.c.id == account_id)) is None:
            raise NotFound("Account not found")
        await conn.execute(
            apps.insert().values(
                id=app.pk,
                account_id=account_id,
                app_id=app.app_id,
                name=app.name,
                created_at=app.created_at,
            )
        )
    return app


async def resolve(conn: AsyncConnection, account_id: str, app_id: str) -> App:
    """Another account's app answers exactly like a missing one."""
    row = (
        await conn.execute(
            sa.select(apps).where(apps.c.app_id == app_id, apps.c.account_id == account_id)
        )
    ).first()
    if row is None:
        raise NotFound("Bad request parameters: application not found for 'appId'")
    return App(
        row.id, row.app_id, row.name, row.created_at, row.contact_count, row.contacts_deleted
    )


async def contacts_changed(
    conn: AsyncConnection, app_pk: str, *, added: int = 0, removed: int = 0
) -> None:
    """Keep the app's contact count in step with an insert or delete of its contacts.

    Every statement that inserts or deletes contacts calls this in its own transaction,
    after its other changes (on PostgreSQL the app row stays locked until the commit, so
    it is taken last). `contacts_deleted` only grows: with the count it changes whenever
    the set of the app's contacts does, which is what `contacts._Marks` relies on.
    """
    if not added and not removed:
        return
    await conn.execute(
        apps.update()
        .where(apps.c.id == app_pk)
        .values(
            contact_count=apps.c.contact_count + (added - removed),
            contacts_deleted=apps.c.contacts_deleted + removed,
        )
    )


async def list_for_account(db: Database, account_id: str) -> list[App]:
    async with db.read() as conn:
        rows = await conn.execute(
            sa.select(apps).where(apps.c.account_id == account_id).order_by(apps.c.created_at)
        )
        return [
            App(r.id, r.app_id, r.name, r.created_at, r.contact_count, r.contacts_deleted)
            for r in rows
        ]
