"""The contacts of an app: table, search, add and edit, (un)subscribe, delete, CSV in and
out. Every change goes through `sendkit.contacts`, the same rules as `/v1/contact`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from starlette.datastructures import FormData
from starlette.responses import Response, StreamingResponse

from sendkit import apps, contacts, imports
from sendkit.apps import App
from sendkit.contacts import ContactKey, ContactSearch, SaveContact, Status
from sendkit.errors import BadRequest, SendKitError
from sendkit.services import Services
from sendkit.validation import parse
from sendkit.web.dashboard.core import (
    Page,
    PageError,
    PageNotFound,
    PageRoute,
    error_message,
    form_of,
    redirect,
    render,
    signed_in,
    text,
    upload,
)

router = APIRouter(route_class=PageRoute, include_in_schema=False)

LABELS = {
    "emailAddress": "Email address",
    "status": "Status",
    "language": "Language",
    "firstName": "First name",
    "lastName": "Last name",
    "phoneNumber": "Phone number",
    "birthday": "Birthday",
    "company": "Company",
    "vipLevel": "VIP level",
    "amount": "Amount",
}
DATA_NAMES = list(contacts.DATA_FIELDS)


async def _app(page: Page, app_id: str) -> App:
    async with page.services.db.read() as conn:
        return await apps.resolve(conn, page.account_id, app_id)


def _friendly(exc: SendKitError) -> str:
    """`'data.birthday' must be ...` reads better as `Birthday must be ...`."""
    message = error_message(exc)
    for name, label in LABELS.items():
        message = message.replace(f"'data.{name}'", label).replace(f"'{name}'", label)
    return message


def _search_of(request: Request) -> ContactSearch:
    params = dict(request.query_params)
    if not params.get("status"):
        params.pop("status", None)
    try:
        return ContactSearch.model_validate(params)
    except ValueError:
        return ContactSearch()


def _query(search: ContactSearch, **changes: Any) -> str:
    values = {"q": search.q, "status": search.status.value if search.status else ""} | changes
    return urlencode({k: v for k, v in values.items() if v not in ("", None, 1)})


# --- the table --------------------------------------------------------------------------


@router.get("/apps/{app_id}/contacts")
async def contact_list(app_id: str, request: Request, page: Page = Depends(signed_in)) -> Response:
    search = _search_of(request)
    app = await _app(page, app_id)
    result = await contacts.search(page.services.db, page.account_id, app_id, search)
    context = {
        "app": app,
        "search": search,
        "result": result,
        "statuses": [s.value for s in Status],
        "prev_query": _query(search, page=max(1, search.page - 1)),
        "next_query": _query(search, page=search.page + 1),
        "has_next": search.page * search.pageSize < result["total"],
        "jobs": await imports.list_jobs(page.services.db, page.account_id, app_id, limit=3),
    }
    if page.is_htmx and request.headers.get("hx-target") == "contact-table":
        return render(page, "_contact_table.html", **context)
    return render(page, "contacts.html", **context)


# --- add and edit -----------------------------------------------------------------------


def _data_of(form: FormData) -> dict[str, Any]:
    """The documented `data` fields from a form: an empty field clears the value."""
    return {name: (text(form, name, 400).strip() or None) for name in DATA_NAMES}


def _contact_form(
    page: Page,
    app: App,
    values: dict[str, Any],
    *,
    contact: dict[str, Any] | None = None,
    error: str | None = None,
) -> Response:
    return render(
        page,
        "contact_form.html",
        status=400 if error else 200,
        app=app,
        contact=contact,
        values=values,
        labels=LABELS,
        data_names=DATA_NAMES,
        statuses=[s.value for s in Status],
        error=error,
    )


@router.get("/apps/{app_id}/contacts/new")
async def contact_new(app_id: str, page: Page = Depends(signed_in)) -> Response:
    app = await _app(page, app_id)
    return _contact_form(page, app, {"status": Status.CONFIRMED.value})


@router.post("/apps/{app_id}/contacts/new")
async def contact_create(
    app_id: str, request: Request, page: Page = Depends(signed_in)
) -> Response:
    app = await _app(page, app_id)
    form = await form_of(request)
    values = {
        "emailAddress": text(form, "emailAddress", 400).strip(),
        "status": text(form, "status"),
    }
    data = _data_of(form)
    try:
        payload = parse(SaveContact, values | {"appId": app.app_id, "data": data})
        created = await contacts.save(page.services.db, page.account_id, payload)
    except SendKitError as exc:
        return _contact_form(page, app, values | data, error=_friendly(exc))
    note = "added" if created else "already existed: its details were updated"
    return redirect(page, f"/apps/{app.app_id}/contacts", f"Contact {payload.emailAddress} {note}.")


async def _contact(page: Page, app_id: str, contact_id: int) -> dict[str, Any]:
    return await contacts.get_by_id(page.services.db, page.account_id, app_id, contact_id)


@router.get("/apps/{app_id}/contacts/{contact_id:int}")
async def contact_edit(app_id: str, contact_id: int, page: Page = Depends(signed_in)) -> Response:
    app = await _app(page, app_id)
    contact = await _contact(page, app_id, contact_id)
    values = {k: ("" if v is None else v) for k, v in contact.items()}
    if values.get("vipLevel") == 0:
        values["vipLevel"] = ""
    return _contact_form(page, app, values, contact=contact)


@router.post("/apps/{app_id}/contacts/{contact_id:int}")
async def contact_update(
    app_id: str, contact_id: int, request: Request, page: Page = Depends(signed_in)
) -> Response:
    app = await _app(page, app_id)
    contact = await _contact(page, app_id, contact_id)
    data = _data_of(await form_of(request))
    fixed = {
        "appId": app.app_id,
        "emailAddress": contact["emailAddress"],
        "status": contact["status"],
    }
    try:
        # An update merges `data`; address and status are create-only, as in the API.
        await contacts.save(
            page.services.db, page.account_id, parse(SaveContact, fixed | {"data": data})
        )
    except SendKitError as exc:
        return _contact_form(page, app, contact | data, contact=contact, error=_friendly(exc))
    return redirect(
        page, f"/apps/{app.app_id}/contacts", f"Contact {contact['emailAddress']} saved."
    )


@router.post("/apps/{app_id}/contacts/{contact_id:int}/status")
async def contact_status(
    app_id: str, contact_id: int, request: Request, page: Page = Depends(signed_in)
) -> Response:
    contact = await _contact(page, app_id, contact_id)
    try:
        status = Status(text(await form_of(request), "status"))
    except ValueError:
        raise PageError("Unknown status.") from None
    await contacts.set_status(
        page.services.db, page.account_id, app_id, contact["emailAddress"], status
    )
    verb = "unsubscribed" if status is Status.UNSUBSCRIBED else "subscribed again"
    return redirect(page, _back(request, app_id), f"{contact['emailAddress']} {verb}.")


@router.post("/apps/{app_id}/contacts/{contact_id:int}/delete")
async def contact_delete(
    app_id: str, contact_id: int, request: Request, page: Page = Depends(signed_in)
) -> Response:
    contact = await _contact(page, app_id, contact_id)
    key = ContactKey(appId=app_id, emailAddress=contact["emailAddress"])
    await contacts.delete(page.services.db, page.account_id, key)
    return redirect(page, _back(request, app_id), f"Contact {contact['emailAddress']} deleted.")


def _back(request: Request, app_id: str) -> str:
    """Back to the table as it was (its filters), never to another site."""
    base = f"/apps/{app_id}/contacts"
    referer = request.headers.get("referer", "")
    marker = base + "?"
    return base + "?" + referer.split(marker, 1)[1] if marker in referer else base


# --- CSV import and export --------------------------------------------------------------


def runner(services: Services) -> imports.ImportRunner:
    existing = services.extras.get("imports")
    if existing is None:
        existing = services.extras["imports"] = imports.ImportRunner(services.db)
    return existing


@router.get("/apps/{app_id}/import")
async def import_form(app_id: str, page: Page = Depends(signed_in)) -> Response:
    app = await _app(page, app_id)
    jobs = await imports.list_jobs(page.services.db, page.account_id, app_id)
    return render(
        page, "import.html", app=app, jobs=jobs, error=None, columns=imports.EXPORT_COLUMNS
    )


def _store(source: IO[bytes], target: Path, limit: int) -> int:
    size = 0
    with target.open("wb") as out:
        while chunk := source.read(1 << 20):
            size += len(chunk)
            if size > limit:
                raise BadRequest(f"The file is larger than {limit // (1024 * 1024)} MB")
            out.write(chunk)
    return size


@router.post("/apps/{app_id}/import")
async def import_start(app_id: str, request: Request, page: Page = Depends(signed_in)) -> Response:
    app = await _app(page, app_id)
    form = await form_of(request)
    file = upload(form, "file")
    services = page.services
    try:
        if file is None:
            raise BadRequest("Choose a CSV file to import")
        status = Status(text(form, "status") or Status.CONFIRMED.value)
        path = imports.upload_path(services.settings.data_dir)
        await asyncio.to_thread(_store, file.file, path, services.settings.import_max_bytes)
    except SendKitError as exc:
        jobs = await imports.list_jobs(services.db, page.account_id, app_id)
        return render(
            page,
            "import.html",
            status=400,
            app=app,
            jobs=jobs,
            error=error_message(exc),
            columns=imports.EXPORT_COLUMNS,
        )
    except ValueError:
        raise PageError("Unknown status.") from None
    job = await imports.create_job(services.db, page.account_id, app_id, file.filename or "", path)
    runner(services).start(job.id, status)
    return redirect(page, f"/imports/{job.id}")


@router.get("/imports/{job_id}")
async def import_status(job_id: str, page: Page = Depends(signed_in)) -> Response:
    job = await imports.get_job(page.services.db, page.account_id, job_id)
    app = await _app_by_pk(page, job.app_pk)
    template = "_import_progress.html" if page.is_htmx else "import_job.html"
    return render(page, template, job=job, app=app)


async def _app_by_pk(page: Page, app_pk: str) -> App:
    for app in await apps.list_for_account(page.services.db, page.account_id):
        if app.pk == app_pk:
            return app
    raise PageNotFound()


@router.get("/apps/{app_id}/contacts.csv")
async def export(app_id: str, page: Page = Depends(signed_in)) -> Response:
    app = await _app(page, app_id)
    rows = await imports.export_rows(page.services.db, page.account_id, app_id)
    filename = f"contacts-{app.app_id}.csv"
    return StreamingResponse(
        rows,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
