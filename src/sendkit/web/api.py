"""The documented `/v1` routes. Each parses, calls one domain function, formats.

`api_call` (checks 1 to 4) is awaited in the handler rather than declared with
`Depends`: the same order and errors, without FastAPI's dependency solving per request."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from sendkit import contacts, messages
from sendkit.validation import parse
from sendkit.web import envelope
from sendkit.web.auth import api_call, params, services_of

router = APIRouter(prefix="/v1")


def _body_schema(model: Any) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True)
    return {"requestBody": {"content": {"application/json": {"schema": schema}}}}


@router.post("/send", openapi_extra=_body_schema(messages.SendRequest), summary="Send an email")
async def send(request: Request) -> envelope.JSONResponse:
    call = await api_call(request)
    payload = parse(messages.SendRequest, params(call, request))
    services = services_of(request)
    accepted = await messages.submit(services.db, call.account, payload, call.request_id)
    services.notify_queued()
    return envelope.ok(call.request_id, None, headers={"X-Message-Id": accepted.message_id})


@router.get("/contact", summary="Get contact list")
async def list_contacts(request: Request) -> envelope.JSONResponse:
    call = await api_call(request)
    query = parse(contacts.ContactQuery, params(call, request))
    page = await contacts.list_page(services_of(request).db, call.account.id, query)
    return envelope.ok(call.request_id, page)


@router.post(
    "/contact", openapi_extra=_body_schema(contacts.SaveContact), summary="Create or update"
)
async def save_contact(request: Request) -> envelope.JSONResponse:
    call = await api_call(request)
    payload = parse(contacts.SaveContact, params(call, request))
    await contacts.save(services_of(request).db, call.account.id, payload)
    return envelope.ok(call.request_id)


@router.delete("/contact", summary="Delete a contact")
async def delete_contact(request: Request) -> envelope.JSONResponse:
    call = await api_call(request)
    key = parse(contacts.ContactKey, params(call, request))
    await contacts.delete(services_of(request).db, call.account.id, key)
    return envelope.ok(call.request_id)
