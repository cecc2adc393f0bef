"""CSV import (a background job with progress) and export, through the dashboard."""

from __future__ import annotations

import csv
import re
import time
from pathlib import Path

import httpx
import pytest

from sendkit import contacts, csvcells, imports
from sendkit.db import import_jobs
from sendkit.services import Services
from tests.conftest import Tenant, make_tenant
from tests.integration.dashboard_helpers import add_user, log_in, submit

ROWS = 100_000


async def signed_in(client: httpx.AsyncClient, services: Services) -> Tenant:
    tenant = await make_tenant(services)
    await add_user(services, tenant.account_id, "importer@acme.example")
    await log_in(client, "importer@acme.example")
    return tenant


async def upload(
    client: httpx.AsyncClient, tenant: Tenant, name: str, content: bytes, status: str = "Confirmed"
) -> str:
    """Start an import; returns its job id (from the redirect to its progress page)."""
    page = f"/apps/{tenant.app_id}/import"
    response = await submit(
        client, page, {"status": status}, files={"file": (name, content, "text/csv")}
    )
    assert response.status_code == 303, response.text[:1000]
    location = response.headers["location"]
    assert location.startswith("/imports/")
    return location.rsplit("/", 1)[1]


async def finish(services: Services) -> None:
    runner = services.extras["imports"]
    assert isinstance(runner, imports.ImportRunner)
    await runner.wait()


def big_csv(path: Path) -> bytes:
    lines = ["emailAddress,firstName,lastName,company,vipLevel,amount,birthday"]
    lines += [
        f"user{i}@example.com,First{i},Last{i},Company {i % 97},{i % 5},{i}.50,"
        f"{i % 28 + 1:02d}/0{i % 9 + 1}"
        for i in range(ROWS)
    ]
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(data)
    return data


@pytest.mark.slow
async def test_import_of_100k_rows_runs_in_the_background(
    client: httpx.AsyncClient, services: Services, tmp_path: Path
) -> None:
    tenant = await signed_in(client, services)
    content = big_csv(tmp_path / "big.csv")
    started = time.monotonic()
    job_id = await upload(client, tenant, "big.csv", content)
    answered = time.monotonic() - started
    assert answered < 10, f"the upload request took {answered:.1f} s"
    progress = await client.get(f"/imports/{job_id}", headers={"HX-Request": "true"})
    assert progress.status_code == 200 and 'role="status"' not in progress.text
    assert "import-progress" in progress.text
    await finish(services)
    took = time.monotonic() - started
    job = await imports.get_job(services.db, tenant.account_id, job_id)
    assert job.status == "done", job.errors
    assert job.percent == 100
    assert (job.total_rows, job.processed_rows, job.created_rows) == (ROWS, ROWS, ROWS)
    assert job.error_rows == 0
    page = await client.get(f"/imports/{job_id}")
    assert "100%" in page.text or 'value="100"' in page.text
    assert "hx-trigger" not in page.text  # finished: no more polling
    listed = await client.get(
        "/v1/contact",
        params={"appId": tenant.app_id, "pageSize": 2, "page": 2},
        headers=tenant.auth,
    )
    data = listed.json()["data"]
    assert data["total"] == ROWS
    assert [c["emailAddress"] for c in data["list"]] == ["user2@example.com", "user3@example.com"]
    assert data["list"][0]["amount"] == "2.50" and data["list"][0]["vipLevel"] == 2
    assert took < 60, f"100k rows took {took:.1f} s"


async def test_import_rules_match_the_api(client: httpx.AsyncClient, services: Services) -> None:
    tenant = await signed_in(client, services)
    await contacts.save(
        services.db,
        tenant.account_id,
        contacts.SaveContact(
            appId=tenant.app_id,
            emailAddress="known@example.com",
            status=contacts.Status.UNSUBSCRIBED,
            data=contacts.ContactData(firstName="Kim", company="Old Co"),
        ),
    )
    content = (
        "\ufeffEmail;First Name;Company;status;vipLevel;unknown column\n"
        "known@example.com;;New Co;Confirmed;;x\n"
        "new@example.com;Ann;;;3;x\n"
        "NEW@example.com;Anne;Dup Co;;;x\n"
        "not-an-address;Bad;;;;x\n"
        "bad-vip@example.com;;;;many;x\n"
        ";;;;;\n"
    ).encode()
    job_id = await upload(client, tenant, "semicolons.csv", content, status="Unsubscribed")
    await finish(services)
    job = await imports.get_job(services.db, tenant.account_id, job_id)
    assert job.status == "done"
    assert (job.created_rows, job.updated_rows, job.error_rows) == (1, 1, 2)
    assert any(e.startswith("row 5:") and "emailAddress" in e for e in job.errors), job.errors
    assert any(e.startswith("row 6:") and "vipLevel" in e for e in job.errors), job.errors
    page = await client.get(f"/imports/{job_id}")
    assert "row 5:" in page.text
    listed = await client.get("/v1/contact", params={"appId": tenant.app_id}, headers=tenant.auth)
    by_address = {c["emailAddress"].lower(): c for c in listed.json()["data"]["list"]}
    known = by_address["known@example.com"]
    # Status counts on create only; empty cells keep what was stored.
    assert known["status"] == "Unsubscribed" and known["firstName"] == "Kim"
    assert known["company"] == "New Co"
    new = by_address["new@example.com"]
    assert new["status"] == "Unsubscribed"  # the form's default for rows without one
    assert (new["firstName"], new["company"], new["vipLevel"]) == ("Anne", "Dup Co", 3)


async def test_export_streams_and_imports_back(
    client: httpx.AsyncClient, services: Services, tmp_path: Path
) -> None:
    tenant = await signed_in(client, services)
    seed = tmp_path / "seed.csv"
    rows = [f'c{i}@example.com,"Name, ""{i}""",1.25' for i in range(1200)]  # > 1 export page
    seed.write_text("emailAddress,firstName,amount\n" + "\n".join(rows) + "\n")
    job = await imports.create_job(services.db, tenant.account_id, tenant.app_id, "seed", seed)
    await imports.run_job(services.db, job.id)
    response = await client.get(f"/apps/{tenant.app_id}/contacts.csv")
    assert response.headers["content-type"].startswith("text/csv")
    exported = response.content
    # Streamed: the header, then one chunk per page of contacts.
    pages = await imports.export_rows(services.db, tenant.account_id, tenant.app_id)
    assert len([chunk async for chunk in pages]) == 3
    lines = exported.decode().splitlines()
    assert lines[0] == ",".join(imports.EXPORT_COLUMNS)
    assert len(lines) == 1201
    assert lines[1].startswith('c0@example.com,Confirmed,,"Name, ""0""",')
    job_id = await upload(client, tenant, "export.csv", exported)
    await finish(services)
    job = await imports.get_job(services.db, tenant.account_id, job_id)
    assert (job.status, job.created_rows, job.updated_rows, job.error_rows) == ("done", 0, 1200, 0)


async def test_bad_files_fail_with_a_reason(client: httpx.AsyncClient, services: Services) -> None:
    tenant = await signed_in(client, services)
    no_email = await upload(client, tenant, "names.csv", b"firstName\nJo\n")
    latin1 = await upload(
        client,
        tenant,
        "latin1.csv",
        "email,firstName\nj@example.com,J\xe9r\xf4me\n".encode("latin-1"),
    )
    await finish(services)
    first = await imports.get_job(services.db, tenant.account_id, no_email)
    assert first.status == "failed" and "emailAddress" in first.errors[0]
    second = await imports.get_job(services.db, tenant.account_id, latin1)
    assert second.status == "failed" and "UTF-8" in second.errors[0]
    page = await client.get(f"/apps/{tenant.app_id}/import")
    assert re.search(r"names\.csv.*failed", page.text, re.S)
    missing = await submit(client, f"/apps/{tenant.app_id}/import", {"status": "Confirmed"})
    assert missing.status_code == 400 and "Choose a CSV file" in missing.text


async def test_a_job_left_running_by_a_stopped_process_shows_as_interrupted(
    client: httpx.AsyncClient, services: Services, tmp_path: Path
) -> None:
    tenant = await signed_in(client, services)
    path = tmp_path / "orphan.csv"
    path.write_text("email\na@example.com\n")
    job = await imports.create_job(services.db, tenant.account_id, tenant.app_id, "orphan", path)
    async with services.db.begin() as conn:
        await conn.execute(
            import_jobs.update()
            .where(import_jobs.c.id == job.id)
            .values(status="running", updated_at=job.updated_at - 10 * 60_000)
        )
    page = await client.get(f"/imports/{job.id}")
    assert "The import stopped." in page.text and "interrupted" in page.text
    assert "hx-trigger" not in page.text
    assert (await imports.get_job(services.db, tenant.account_id, job.id)).status == "failed"


async def test_export_defuses_formulas_and_imports_them_back_unchanged(
    client: httpx.AsyncClient, services: Services, tmp_path: Path
) -> None:
    """A cell starting with = + - @ would run as a formula in a spreadsheet (CSV
    injection): the export puts an apostrophe before it, the import takes it off."""
    tenant = await signed_in(client, services)
    risky = {
        "firstName": '=HYPERLINK("https://evil.example","x")',
        "lastName": "-dash",
        "company": "'+1 Corp",  # an apostrophe of its own survives the round trip
    }
    seed = tmp_path / "seed.csv"
    with seed.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["emailAddress", *risky])
        writer.writerow([csvcells.escape(v) for v in ["-lead@example.com", *risky.values()]])
    job = await imports.create_job(services.db, tenant.account_id, tenant.app_id, "seed", seed)
    await imports.run_job(services.db, job.id)

    exported = (await client.get(f"/apps/{tenant.app_id}/contacts.csv")).content.decode()
    header, line = exported.splitlines()[:2]
    cells = dict(zip(header.split(","), next(csv.reader([line])), strict=False))
    assert cells["emailAddress"] == "'-lead@example.com"
    assert {k: cells[k] for k in risky} == {k: "'" + v for k, v in risky.items()}

    job_id = await upload(client, tenant, "export.csv", exported.encode())
    await finish(services)
    job = await imports.get_job(services.db, tenant.account_id, job_id)
    assert (job.updated_rows, job.error_rows) == (1, 0)
    page = await contacts.list_page(
        services.db,
        tenant.account_id,
        contacts.ContactQuery.model_validate({"appId": tenant.app_id}),
    )
    (contact,) = page["list"]
    assert contact["emailAddress"] == "-lead@example.com"
    assert {k: contact[k] for k in risky} == risky
