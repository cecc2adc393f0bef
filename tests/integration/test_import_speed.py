"""The faster CSV import (reading ahead in a thread, several batches per transaction, one
driver-level insert per batch) must store exactly what saving each row through the API
rules stores, count the same, and keep what it committed before a broken line."""

from __future__ import annotations

import asyncio
import csv
import random
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from sendkit import apps, contacts, imports
from sendkit.db import Database
from sendkit.db import contacts as contacts_table
from sendkit.services import Services
from sendkit.validation import describe
from tests.conftest import Tenant

HEADER = [
    "Email",
    "status",
    "firstName",
    "lastName",
    "language",
    "phoneNumber",
    "birthday",
    "company",
    "vipLevel",
    "amount",
]


@pytest.fixture(autouse=True)
def _small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    # Many batches and transactions from a small file.
    monkeypatch.setattr(imports, "BATCH", 50)
    monkeypatch.setattr(imports, "GROUP", 3)


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The reading processes started, so a test can see that one was."""
    processes: list[Any] = []
    start = imports._ProcessSource.start

    async def recorded(*args: Any) -> imports._ProcessSource:
        source = await start(*args)
        processes.append(source._process)
        return source

    monkeypatch.setattr(imports._ProcessSource, "start", recorded)
    return processes


@pytest.fixture(params=["thread", "process"])
def reading(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, started: list[Any]
) -> list[Any]:
    """Read the file in a thread, or in a reading process (a large file's way) even when it
    is small; the processes started."""
    monkeypatch.setattr(imports, "_PROCESS_ROWS", 0 if request.param == "process" else 10**9)
    return started


def messy_rows(count: int) -> list[list[str]]:
    """Valid rows with every column, repeats (other case, later batches), bad cells."""
    rng = random.Random(7)
    rows = []
    for i in range(count):
        n = rng.randrange(count // 2)  # about half the rows repeat an address
        email = f"Person.{n}@Example.org" if rng.random() < 0.3 else f"person.{n}@example.org"
        row = [
            email,
            rng.choice(["", "", "confirmed", "Unsubscribed", "UNSUBSCRIBED"]),
            rng.choice(["", f"First {i}", " Spaced  "]),
            rng.choice(["", f"Last{i}"]),
            rng.choice(["", "en", "fr-CA"]),
            rng.choice(["", "+1 555 0100"]),
            rng.choice(["", "01/02", "1990-01-31", "31/02", "2001-02-29"]),
            rng.choice(["", f"Co {i % 7}"]),
            rng.choice(["", "0", "3", " 12 ", "many", "-1"]),
            rng.choice(["", "100.00", "1e3", "12.5"]),
        ]
        if rng.random() < 0.04:
            row[0] = rng.choice(["not-an-address", "a@b", "x y@example.org", "<a@example.org>"])
        rows.append(row)
    return rows


def csv_text(rows: list[list[str]]) -> str:
    return "\r\n".join(",".join(r) for r in [HEADER, *rows]) + "\r\n"


async def run_import(services: Services, tenant: Tenant, app_id: str, text: bytes) -> imports.Job:
    path = imports.upload_path(services.settings.data_dir)
    path.write_bytes(text)
    job = await imports.create_job(services.db, tenant.account_id, app_id, "t.csv", path)
    return await imports.run_job(services.db, job.id)


async def stored(db: Database, pk: str) -> list[tuple[Any, ...]]:
    """The app's contacts in creation order, without ids and times."""
    skip = {"id", "app_pk", "created_at", "updated_at"}
    columns = [c for c in contacts_table.c if c.name not in skip]
    async with db.read() as conn:
        rows = await conn.execute(
            sa.select(*columns).where(contacts_table.c.app_pk == pk).order_by(contacts_table.c.id)
        )
        return [tuple(r) for r in rows]


async def test_import_stores_what_saving_each_row_stores(
    services: Services, tenant: Tenant, reading: list[Any]
) -> None:
    db = services.db
    rows = messy_rows(700)
    other = await apps.create(db, tenant.account_id, "Reference")
    for app_id in (tenant.app_id, other.app_id):  # known before the import, in both apps
        for email in ("person.3@example.org", "PERSON.4@example.org"):
            request = contacts.SaveContact(
                appId=app_id,
                emailAddress=email,
                status="Unsubscribed",
                data=contacts.ContactData(firstName="Kept", company="Old"),
            )
            await contacts.save(db, tenant.account_id, request)

    job = await run_import(services, tenant, tenant.app_id, csv_text(rows).encode())

    # The reference: each row through the API's own rules, one save at a time.
    created, errors = 0, []
    for line, row in enumerate(rows, start=2):
        given = {k: v.strip() for k, v in zip(HEADER[2:], row[2:], strict=True) if v.strip()}
        try:
            request = contacts.SaveContact.model_validate(
                {
                    "appId": other.app_id,
                    "emailAddress": row[0].strip(),
                    "status": row[1].strip().capitalize() or "Confirmed",
                    "data": given,
                }
            )
        except ValidationError as exc:
            errors.append(f"row {line}: {describe(exc).removeprefix('Bad request ')}")
            continue
        created += await contacts.save(db, tenant.account_id, request)

    assert job.status == "done"
    assert (job.created_rows, job.error_rows, job.processed_rows) == (created, len(errors), 700)
    assert job.errors == errors[:20]
    async with db.read() as conn:
        mine = await apps.resolve(conn, tenant.account_id, tenant.app_id)
        reference = await apps.resolve(conn, tenant.account_id, other.app_id)
    assert await stored(db, mine.pk) == await stored(db, reference.pk)
    assert mine.contact_count == reference.contact_count == created + 2
    assert len(reading) == (imports._PROCESS_ROWS == 0)


async def test_counts_follow_the_batches(
    services: Services, tenant: Tenant, reading: list[Any]
) -> None:
    """An address repeated within a batch is created once; in a later batch (same
    transaction or not) it is an update, exactly as before batches were grouped."""
    lines = [[f"u{i}@example.org", "", f"F{i}"] + [""] * 7 for i in range(120)]
    lines[10] = ["u0@example.org", "", "Again"] + [""] * 7  # same batch as u0
    lines[60] = ["u1@example.org", "", "Later"] + [""] * 7  # next batch, same transaction
    lines[170 - 60] = ["u2@example.org", "", "Latest"] + [""] * 7  # third batch
    job = await run_import(services, tenant, tenant.app_id, csv_text(lines).encode())
    assert (job.created_rows, job.updated_rows, job.error_rows) == (117, 2, 0)
    listed = await contacts.list_page(
        services.db, tenant.account_id, contacts.ContactQuery(appId=tenant.app_id)
    )
    assert listed["total"] == 117
    names = {c["emailAddress"]: c["firstName"] for c in listed["list"]}
    assert (names["u0@example.org"], names["u1@example.org"]) == ("Again", "Later")
    assert names["u2@example.org"] == "Latest"
    assert len(reading) == (imports._PROCESS_ROWS == 0)
    assert all(process.returncode == 0 for process in reading)


@pytest.mark.parametrize(
    ("text", "reason", "created"),
    [
        (b"firstName\nJo\n", "needs an 'emailAddress' (or 'email') column", 0),
        # Counting the rows reads this file by commas; the reader, by its semicolons, finds
        # a quoted cell over the csv module's size limit after two and a half batches.
        (
            b"email;firstName\n"
            + b"".join(b"user%d@example.org;U\n" % i for i in range(120))
            + b'late@example.org;"'
            + b"x\n" * 100_000,
            "could not be read",
            100,
        ),
    ],
)
async def test_a_bad_file_fails_with_its_reason_from_either_reader(
    services: Services,
    tenant: Tenant,
    reading: list[Any],
    text: bytes,
    reason: str,
    created: int,
) -> None:
    job = await run_import(services, tenant, tenant.app_id, text)
    assert job.status == "failed" and reason in job.errors[0], job.errors
    assert job.created_rows == created  # the batches read before the failure are kept
    assert len(reading) == (imports._PROCESS_ROWS == 0)


async def test_a_file_of_process_rows_is_read_in_a_process(
    services: Services, tenant: Tenant, started: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(imports, "_PROCESS_ROWS", 30)
    for count, processes in ((29, 0), (30, 1)):
        lines = [[f"n{count}.{i}@example.org"] + [""] * 9 for i in range(count)]
        job = await run_import(services, tenant, tenant.app_id, csv_text(lines).encode())
        assert (job.status, job.created_rows) == ("done", count)
        assert len(started) == processes
    assert started[0].returncode == 0  # it ended by itself at the end of the file


async def test_a_reading_process_that_dies_fails_the_job(
    services: Services, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(imports, "_PROCESS_ROWS", 0)
    start = imports._ProcessSource.start

    async def killed(*args: Any) -> imports._ProcessSource:
        source = await start(*args)
        source._process.kill()
        return source

    monkeypatch.setattr(imports._ProcessSource, "start", killed)
    path = imports.upload_path(services.settings.data_dir)
    path.write_bytes(csv_text(messy_rows(100)).encode())
    job = await imports.create_job(services.db, tenant.account_id, tenant.app_id, "t.csv", path)
    runner = imports.ImportRunner(services.db)
    runner.start(job.id)
    await runner.wait()
    failed = await imports.get_job(services.db, tenant.account_id, job.id)
    assert failed.status == "failed"
    assert failed.errors == ["The import failed unexpectedly."]
    assert not path.exists()


async def test_a_stopped_import_stops_its_reading_process(
    services: Services, tenant: Tenant, started: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(imports, "_PROCESS_ROWS", 0)
    path = imports.upload_path(services.settings.data_dir)
    lines = [[f"user{i}@example.org"] + [""] * 9 for i in range(50_000)]
    path.write_bytes(csv_text(lines).encode())
    job = await imports.create_job(services.db, tenant.account_id, tenant.app_id, "t.csv", path)
    runner = imports.ImportRunner(services.db)
    runner.start(job.id)
    deadline = asyncio.get_running_loop().time() + 60
    while (await imports.get_job(services.db, tenant.account_id, job.id)).processed_rows == 0:
        assert asyncio.get_running_loop().time() < deadline, "no batch written in 60 s"
        await asyncio.sleep(0.01)
    await runner.close()
    assert started[0].returncode is not None  # stopped and reaped, not left reading
    stopped = await imports.get_job(services.db, tenant.account_id, job.id)
    assert stopped.status == "failed" and "interrupted" in stopped.errors[0]
    assert 0 < stopped.processed_rows < 50_000


async def test_a_read_failing_midway_keeps_the_batches_before(
    services: Services, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches are read a group ahead; those read before a failure are still committed
    (as when each batch was read and committed alone), none after it."""
    read = imports._Reader.batch
    calls = 0

    def failing(self: imports._Reader) -> tuple[list[Any], list[str]]:
        nonlocal calls
        calls += 1
        if calls == 5:  # in the middle of the second group
            raise csv.Error("line 201: boom")
        return read(self)

    monkeypatch.setattr(imports._Reader, "batch", failing)
    text = csv_text([[f"user{i}@example.org"] + [""] * 9 for i in range(1000)]).encode()
    job = await run_import(services, tenant, tenant.app_id, text)
    assert job.status == "failed"
    assert job.errors == ["The file could not be read: line 201: boom"]
    assert job.created_rows == job.processed_rows == 200
    listed = await contacts.list_page(
        services.db, tenant.account_id, contacts.ContactQuery(appId=tenant.app_id)
    )
    assert listed["total"] == 200
    assert listed["list"][-1]["emailAddress"] == "user199@example.org"


async def test_a_large_import_refreshes_the_statistics(
    services: Services, tenant: Tenant, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    monkeypatch.setattr(imports, "_ANALYZE_AFTER", 100)
    lines = [[f"user{i}@example.org"] + [""] * 9 for i in range(150)]
    job = await run_import(services, tenant, tenant.app_id, csv_text(lines).encode())
    assert job.status == "done" and job.created_rows == 150
    if backend == "postgres":
        async with services.db.read() as conn:
            tuples = await conn.scalar(
                sa.text("SELECT reltuples FROM pg_class WHERE relname = 'contacts'")
            )
        assert tuples == 150


def test_plain_addresses_take_the_shortcut_with_the_same_answer() -> None:
    from sendkit import addresses

    addresses.parse_mailbox.cache_clear()
    addresses._VALID_DOMAINS.clear()

    def full(value: str) -> tuple[str, Any]:
        try:
            return "ok", addresses._parse_fully(value)
        except ValueError as exc:
            return "error", str(exc)

    def bare(value: str) -> tuple[str, Any]:
        try:
            return "ok", addresses.parse_mailbox(value)
        except ValueError as exc:
            return "error", str(exc)

    domains = [
        "example.org",
        "EXAMPLE.Org",
        "a.b",
        "localhost",
        "x.test",
        "example.invalid",
        "xn--bcher-kva.example",
        "b\u00fccher.example",
        "-bad.com",
        "bad-.com",
        "a..b",
        "example.org.",
        "1.2.3.4",
        "exa_mple.com",
        "a" * 63 + ".com",
        "a" * 64 + ".com",
        "sub." + "b" * 60 + "." + "c" * 60 + "." + "d" * 60 + ".com",
    ]
    local_parts = [
        "user",
        "User.Name",
        "a+b",
        "a..b",
        ".a",
        "a.",
        "postmaster",
        "Abuse",
        "o'brien",
        "x" * 64,
        "x" * 65,
        "y" * 200,
        "\u00e9",
        "a b",
        '"q"',
        "!#$%&*/=?^`{|}~-",
    ]
    for _ in range(2):  # the second round answers from the remembered domains
        for local in local_parts:
            for domain in domains:
                value = f"{local}@{domain}"
                assert bare(value) == full(value), value
    assert addresses._VALID_DOMAINS.get("EXAMPLE.Org") == "example.org"
    assert "b\u00fccher.example" not in addresses._VALID_DOMAINS


async def test_blank_and_whitespace_only_rows_are_skipped_by_either_reader(
    services: Services, tenant: Tenant, reading: list[Any]
) -> None:
    """An empty line, a row of empty cells and a row of whitespace-only cells are not
    contacts and not errors; the rows after them keep their line numbers in errors."""
    empty = "," * (len(HEADER) - 1)
    spaces = ", \t," + " ," * (len(HEADER) - 3) + "  "
    text = "\r\n".join(
        [
            ",".join(HEADER),
            "first@example.org" + "," * (len(HEADER) - 1),
            "",
            empty,
            spaces,
            "not-an-address" + "," * (len(HEADER) - 1),
            "second@example.org" + "," * (len(HEADER) - 1),
        ]
    )
    job = await run_import(services, tenant, tenant.app_id, (text + "\r\n").encode())
    assert job.status == "done"
    assert (job.created_rows, job.updated_rows, job.error_rows) == (2, 0, 1)
    assert len(job.errors) == 1 and job.errors[0].startswith("row 6:")
    listed = await contacts.list_page(
        services.db, tenant.account_id, contacts.ContactQuery(appId=tenant.app_id)
    )
    assert sorted(c["emailAddress"] for c in listed["list"]) == [
        "first@example.org",
        "second@example.org",
    ]
    assert len(reading) == (imports._PROCESS_ROWS == 0)
