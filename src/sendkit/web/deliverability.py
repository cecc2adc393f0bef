"""`/v1` routes for webhooks, the suppression list and events: thin, like `api.py`.

Same envelope, same auth (`api_call`: checks 1 to 4), same parameter rules (query string
or body). The CSV export is the one answer that is not the envelope.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from sendkit import events, suppressions, webhooks
from sendkit.validation import parse
from sendkit.web import envelope
from sendkit.web.auth import ApiCall, api_call, params, services_of

router = APIRouter(prefix="/v1")


# --- webhooks -----------------------------------------------------------------------------


@router.get("/webhooks", summary="List webhook endpoints")
async def list_webhooks(
    request: Request, call: ApiCall = Depends(api_call)
) -> envelope.JSONResponse:
    found = await webhooks.list_endpoints(services_of(request).db, call.account.id)
    return envelope.ok(call.request_id, {"list": found})


@router.post("/webhooks", summary="Create a webhook endpoint (its secret is shown once)")
async def create_webhook(
    request: Request, call: ApiCall = Depends(api_call)
) -> envelope.JSONResponse:
    payload = parse(webhooks.CreateWebhook, params(call, request))
    services = services_of(request)
    created = await webhooks.create_endpoint(
        services.db, services.box, services.settings, call.account.id, payload
    )
    return envelope.ok(call.request_id, created)


@router.delete("/webhooks", summary="Delete a webhook endpoint (`id` as a parameter)")
async def delete_webhook_by_param(
    request: Request, call: ApiCall = Depends(api_call)
) -> envelope.JSONResponse:
    endpoint_id = str(params(call, request).get("id") or "")
    await webhooks.delete_endpoint(services_of(request).db, call.account.id, endpoint_id)
    return envelope.ok(call.request_id)


@router.get("/webhooks/{endpoint_id}", summary="One webhook endpoint")
async def get_webhook(
    endpoint_id: str, request: Request, call: ApiCall = Depends(api_call)
) -> envelope.JSONResponse:
    found = await webhooks.get_endpoint(services_of(request).db, call.account.id, endpoint_id)
    return envelope.ok(call.request_id, found)


@router.patch("/webhooks/{endpoint_id}", summary="Change url, events or enabled")
async def update_webhook(
    endpoint_id: str, request: Request, call: ApiCall = Depends(api_call)
) -> envelope.JSONResponse:
    payload = parse(webhooks.UpdateWebhook, params(call, request))
    services = services_of(request)
    updated = await webhooks.update_endpoint(
        services.db, services.settings, call.account.id, endpoint_id, payload
    )
    return envelope.ok(call.request_id, updated)


@router.delete("/webhooks/{endpoint_id}", summary="Delete a webhook endpoint")
async def delete_webhook(
    endpoint_id: str, request: Request, call: ApiCall = Depends(api_call)
) -> envelope.JSONResponse:
    await webhooks.delete_endpoint(services_of(request).db, call.account.id, endpoint_id)
    return envelope.ok(call.request_id)


@router.post("/webhooks/{endpoint_id}/secret", summary="Rotate the signing secret")
async def rotate_webhook_secret(
    endpoint_id: str, request: Request, call: ApiCall = Depends(api_call)
) -> envelope.JSONResponse:
    services = services_of(request)
    secret = await webhooks.rotate_secret(services.db, services.box, call.account.id, endpoint_id)
    return envelope.ok(call.request_id, {"secret": secret})


@router.get("/webhooks/{endpoint_id}/deliveries", summary="Deliveries with their attempts")
async def list_webhook_deliveries(
    endpoint_id: str, request: Request, call: ApiCall = Depends(api_call)
) -> envelope.JSONResponse:
    query = parse(webhooks.DeliveryQuery, params(call, request))
    found = await webhooks.list_deliveries(
        services_of(request).db, call.account.id, endpoint_id, query
    )
    return envelope.ok(call.request_id, {"list": found})


@router.get("/webhooks/{endpoint_id}/deliveries/{delivery_id}", summary="One delivery")
async def get_webhook_delivery(
    endpoint_id: str, delivery_id: str, request: Request, call: ApiCall = Depends(api_call)
) -> envelope.JSONResponse:
    found = await webhooks.get_delivery(
        services_of(request).db, call.account.id, endpoint_id, delivery_id
    )
    return envelope.ok(call.request_id, found)


@router.post("/webhooks/{endpoint_id}/replay/{delivery_id}", summary="Send a delivery again")
async def replay_webhook_delivery(
    endpoint_id: str, delivery_id: str, request: Request, call: ApiCall = Depends(api_call)
) -> envelope.JSONResponse:
    services = services_of(request)
    new_id = await webhooks.replay(services.db, call.account.id, endpoint_id, delivery_id)
    worker = services.extras.get("webhook_worker")
    if worker is not None:
        worker.wakeup.set()
    return envelope.ok(call.request_id, {"deliveryId": new_id})


# --- suppressions -------------------------------------------------------------------------


@router.get("/suppressions", summary="The suppression list")
async def list_suppressions(
    request: Request, call: ApiCall = Depends(api_call)
) -> envelope.JSONResponse:
    query = parse(suppressions.SuppressionQuery, params(call, request))
    page = await suppressions.list_page(services_of(request).db, call.account.id, query)
    return envelope.ok(call.request_id, page)


@router.post("/suppressions", summary="Add an address to the suppression list")
async def add_suppression(
    request: Request, call: ApiCall = Depends(api_call)
) -> envelope.JSONResponse:
    payload = parse(suppressions.AddSuppression, params(call, request))
    added = await suppressions.add_manual(services_of(request).db, call.account.id, payload)
    return envelope.ok(call.request_id, {"added": added})


@router.delete("/suppressions", summary="Remove an address from the suppression list")
async def remove_suppression(
    request: Request, call: ApiCall = Depends(api_call)
) -> envelope.JSONResponse:
    key = parse(suppressions.SuppressionKey, params(call, request))
    await suppressions.remove(services_of(request).db, call.account.id, key.emailAddress)
    return envelope.ok(call.request_id)


@router.get("/suppressions/export", summary="The suppression list as CSV")
async def export_suppressions(
    request: Request, call: ApiCall = Depends(api_call)
) -> StreamingResponse:
    rows = suppressions.export_csv(services_of(request).db, call.account.id)
    return StreamingResponse(
        rows,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="suppressions.csv"'},
    )


# --- events -------------------------------------------------------------------------------


@router.get("/events", summary="Events: queued, delivered, bounced, complained, ...")
async def list_events(request: Request, call: ApiCall = Depends(api_call)) -> envelope.JSONResponse:
    query = parse(events.EventQuery, params(call, request))
    found = await events.list_for_account(services_of(request).db, call.account.id, query)
    return envelope.ok(call.request_id, {"list": found})
