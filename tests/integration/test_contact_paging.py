"""`GET /v1/contact` without count(*) and big OFFSETs: `total` comes from the app's kept
count and pages start at cached marks (`contacts._Marks`). Every answer must equal what
count(*) and a plain OFFSET give, on both databases, after any insert or delete, and
across processes."""

from __future__ import annotations

import math
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sendkit import apps, contacts, imports
from sendkit.db import Database, now_ms
from sendkit.db import apps as apps_table
from sendkit.db import contacts as contacts_table
from sendkit.services import Services
from tests.conftest import Tenant

MARK_EVERY = 7  # small, so a few dozen contacts span many marks


@pytest.fixture(autouse=True)
def _small_marks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(contacts, "_MARK_EVERY", MARK_EVERY)


@pytest.fixture
async def second_db(database_url: str) -> AsyncIterator[Database]:
    """Another process's view of the same database: its own engine and its own marks."""
    db = Database(database_url)
    yield db
    await db.dispose()


async def app_pk(services: Services, tenant: Tenant) -> str:
    async with services.db.read() as conn:
        return (await apps.resolve(conn, tenant.account_id, tenant.app_id)).pk


async def counted(db: Database, pk: str) -> tuple[int, int]:
    """(count(*) of the app's contacts, the app's kept contact_count)."""
    async with db.read() as conn:
        real = await conn.scalar(sa.select(sa.func.count()).where(contacts_table.c.app_pk == pk))
        kept = await conn.scalar(sa.select(apps_table.c.contact_count).where(apps_table.c.id == pk))
    return int(real or 0), int(kept or 0)


async def offset_page(db: Database, pk: str, page: int, size: int) -> list[dict[str, Any]]:
    """The page as the plain OFFSET query gives it, item by item."""
    async with db.read() as conn:
        rows = await conn.execute(
            sa.select(contacts_table)
            .where(contacts_table.c.app_pk == pk)
            .order_by(contacts_table.c.id)
            .limit(size)
            .offset((page - 1) * size)
        )
        return [
            {"emailAddress": r.email, "status": r.status}
            | {api: getattr(r, column) for api, column in contacts.DATA_FIELDS.items()}
            for r in rows
        ]


async def assert_pages_match(
    db: Database, tenant: Tenant, pk: str, sizes: tuple[int, ...] = (1, 3, 7, 10, 13, 500)
) -> None:
    total, kept = await counted(db, pk)
    assert kept == total
    for size in sizes:
        last = max(1, math.ceil(total / size))
        for page in sorted({1, 2, last // 2 or 1, last - 1 or 1, last, last + 1, last + 50}):
            query = contacts.ContactQuery(appId=tenant.app_id, page=page, pageSize=size)
            got = await contacts.list_page(db, tenant.account_id, query)
            assert got["total"] == total, (size, page)
            assert (got["page"], got["pageSize"]) == (page, size)
            assert got["list"] == await offset_page(db, pk, page, size), (size, page)


async def import_csv(
    services: Services, tenant: Tenant, tmp_path: Path, lines: list[str]
) -> imports.Job:
    path = imports.upload_path(tmp_path)
    path.write_text("\r\n".join(["emailAddress,firstName,vipLevel", *lines]) + "\r\n")
    job = await imports.create_job(services.db, tenant.account_id, tenant.app_id, "t", path)
    return await imports.run_job(services.db, job.id)


def rows(start: int, stop: int) -> list[str]:
    return [f"user{i}@example.org,First{i},{i % 5}" for i in range(start, stop)]


async def save(db: Database, tenant: Tenant, email: str) -> bool:
    request = contacts.SaveContact(appId=tenant.app_id, emailAddress=email, status="Confirmed")
    return await contacts.save(db, tenant.account_id, request)


async def delete(db: Database, tenant: Tenant, email: str) -> None:
    key = contacts.ContactKey(appId=tenant.app_id, emailAddress=email)
    await contacts.delete(db, tenant.account_id, key)


async def test_total_follows_saves_deletes_and_imports(
    services: Services, tenant: Tenant, tmp_path: Path
) -> None:
    db = services.db
    pk = await app_pk(services, tenant)
    assert await counted(db, pk) == (0, 0)

    assert await save(db, tenant, "a@example.org") is True
    assert await save(db, tenant, "A@example.org") is False  # an update: not counted
    assert await save(db, tenant, "b@example.org") is True
    assert await counted(db, pk) == (2, 2)

    # New rows, a known row, a repeat within the batch (merged) and a bad row.
    job = await import_csv(
        services,
        tenant,
        tmp_path,
        [*rows(0, 30), "a@example.org,Ay,1", "user3@example.org,Again,2", "not-an-address,X,1"],
    )
    assert (job.status, job.created_rows, job.updated_rows, job.error_rows) == ("done", 30, 1, 1)
    assert await counted(db, pk) == (32, 32)

    await delete(db, tenant, "user7@example.org")
    await delete(db, tenant, "A@EXAMPLE.ORG")
    assert await counted(db, pk) == (30, 30)
    again = await import_csv(services, tenant, tmp_path, rows(0, 35))
    assert (again.created_rows, again.updated_rows) == (6, 29)
    assert await counted(db, pk) == (36, 36)

    listed = await contacts.list_page(
        db, tenant.account_id, contacts.ContactQuery(appId=tenant.app_id)
    )
    assert listed["total"] == 36 and len(listed["list"]) == 36


async def test_total_counts_each_app_alone(services: Services, tenant: Tenant) -> None:
    other = await apps.create(services.db, tenant.account_id, "Other")
    await save(services.db, tenant, "a@example.org")
    request = contacts.SaveContact(
        appId=other.app_id, emailAddress="a@example.org", status="Confirmed"
    )
    await contacts.save(services.db, tenant.account_id, request)
    await contacts.save(
        services.db, tenant.account_id, request.model_copy(update={"emailAddress": "b@x.org"})
    )
    mine = await contacts.list_page(
        services.db, tenant.account_id, contacts.ContactQuery(appId=tenant.app_id)
    )
    theirs = await contacts.list_page(
        services.db, tenant.account_id, contacts.ContactQuery(appId=other.app_id)
    )
    assert (mine["total"], theirs["total"]) == (1, 2)


async def test_pages_equal_the_offset_query(
    services: Services, tenant: Tenant, tmp_path: Path
) -> None:
    pk = await app_pk(services, tenant)
    await assert_pages_match(services.db, tenant, pk)  # no contacts at all
    await import_csv(services, tenant, tmp_path, rows(0, 100))
    await assert_pages_match(services.db, tenant, pk)

    # Deletes at the start, in the middle (inside and at a mark) and at the end.
    for i in (0, 1, 7, 8, 50, 63, 99):
        await delete(services.db, tenant, f"user{i}@example.org")
    await assert_pages_match(services.db, tenant, pk)

    # Appends (the marks are extended), then an import that also updates.
    for i in range(100, 110):
        await save(services.db, tenant, f"user{i}@example.org")
    await assert_pages_match(services.db, tenant, pk)
    await import_csv(services, tenant, tmp_path, rows(90, 140))
    await assert_pages_match(services.db, tenant, pk)


async def test_an_id_that_commits_late_is_not_missed(services: Services, tenant: Tenant) -> None:
    """On PostgreSQL a transaction can commit an id below ids already visible. The marks
    must then be rebuilt, not extended."""
    db = services.db
    pk = await app_pk(services, tenant)
    base = 10**12  # explicit ids, far from the sequence's

    async def insert(ids: list[int]) -> None:
        now = now_ms()
        async with db.begin() as conn:
            await conn.execute(
                contacts_table.insert(),
                [
                    {"id": base + i, "app_pk": pk, "email": f"u{i}@example.org"}
                    | {"email_lower": f"u{i}@example.org", "status": "Confirmed"}
                    | {"created_at": now, "updated_at": now}
                    for i in ids
                ],
            )
            await apps.contacts_changed(conn, pk, added=len(ids))

    await insert(list(range(0, 80, 2)))
    await assert_pages_match(db, tenant, pk, sizes=(3, 10))
    await insert([41])  # late, below the largest id
    await assert_pages_match(db, tenant, pk, sizes=(3, 10))
    await insert([100, 101, 103])  # plain appends
    await assert_pages_match(db, tenant, pk, sizes=(3, 10))
    await insert([5, 200])  # one late and one append together
    await assert_pages_match(db, tenant, pk, sizes=(3, 10))


async def test_a_write_through_another_process_is_seen(
    services: Services, tenant: Tenant, tmp_path: Path, second_db: Database
) -> None:
    pk = await app_pk(services, tenant)
    await import_csv(services, tenant, tmp_path, rows(0, 60))
    await assert_pages_match(services.db, tenant, pk)
    await assert_pages_match(second_db, tenant, pk)  # both processes have marks now

    await delete(second_db, tenant, "user20@example.org")  # a delete in the middle
    await assert_pages_match(services.db, tenant, pk)
    await save(second_db, tenant, "late@example.org")  # an append
    await assert_pages_match(services.db, tenant, pk)
    await delete(services.db, tenant, "user3@example.org")
    await save(services.db, tenant, "later@example.org")
    await assert_pages_match(second_db, tenant, pk)
    await delete(second_db, tenant, "late@example.org")  # the same count as before, one less
    await save(second_db, tenant, "latest@example.org")
    await assert_pages_match(services.db, tenant, pk)


async def test_the_dashboard_table_pages_the_same_way(
    services: Services, tenant: Tenant, tmp_path: Path
) -> None:
    pk = await app_pk(services, tenant)
    await import_csv(services, tenant, tmp_path, rows(0, 40))
    await delete(services.db, tenant, "user9@example.org")
    for page in (1, 3, 4, 5, 9):
        found = await contacts.search(
            services.db,
            tenant.account_id,
            tenant.app_id,
            contacts.ContactSearch(page=page, pageSize=5),
        )
        expected = await offset_page(services.db, pk, page, 5)
        assert found["total"] == found["appTotal"] == 39
        assert [
            {k: v for k, v in i.items() if k not in ("id", "updatedAt")} for i in found["list"]
        ] == expected
    filtered = await contacts.search(
        services.db, tenant.account_id, tenant.app_id, contacts.ContactSearch(q="user1", pageSize=5)
    )
    assert (filtered["total"], filtered["appTotal"]) == (11, 39)  # user1, user10..user19


async def test_the_migration_counts_the_contacts_already_there(
    sqlite_template: Path, tmp_path: Path
) -> None:
    """0005 adds the columns to a database that has contacts and fills the count in (on a
    SQLite copy: the session's PostgreSQL database is shared by the other tests)."""
    from alembic import command

    from sendkit.migrate import alembic_config, migrate

    path = tmp_path / "old.db"
    shutil.copyfile(sqlite_template, path)
    db = Database(f"sqlite+aiosqlite:///{path}")

    def downgrade(conn: sa.Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0004_dashboard")

    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(downgrade)
            now = now_ms()
            await conn.execute(
                sa.text(
                    "INSERT INTO accounts (id, name, active, is_demo, is_system,"
                    " rate_per_second, daily_limit, max_message_size, created_at)"
                    " VALUES ('acc', 'A', 1, 0, 0, 5, 10, 10, :now)"
                ),
                {"now": now},
            )
            for pk in ("app1", "app2", "app3"):
                await conn.execute(
                    sa.text(
                        "INSERT INTO apps (id, account_id, app_id, name, created_at)"
                        " VALUES (:pk, 'acc', :pk, :pk, :now)"
                    ),
                    {"pk": pk, "now": now},
                )
            for i, pk in enumerate(["app1"] * 5 + ["app2"] * 2):
                await conn.execute(
                    sa.text(
                        "INSERT INTO contacts (app_pk, email, email_lower, status, language,"
                        " first_name, last_name, phone_number, birthday, company, vip_level,"
                        " amount, created_at, updated_at) VALUES (:pk, :e, :e, 'Confirmed',"
                        " '', '', '', '', '', '', 0, '', :now, :now)"
                    ),
                    {"pk": pk, "e": f"u{i}@example.org", "now": now},
                )
        await migrate(db)
        async with db.read() as conn:
            counts = await conn.execute(
                sa.select(
                    apps_table.c.id, apps_table.c.contact_count, apps_table.c.contacts_deleted
                ).order_by(apps_table.c.id)
            )
            assert [tuple(r) for r in counts] == [("app1", 5, 0), ("app2", 2, 0), ("app3", 0, 0)]
    finally:
        await db.dispose()
