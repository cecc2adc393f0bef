"""`/u/{token}`: the List-Unsubscribe URL.

GET only shows a confirmation page: mail scanners and link previews fetch every URL in a
message, and must not unsubscribe anyone. POST unsubscribes, without a cookie or a login,
as RFC 8058 one-click requires (mail clients send `List-Unsubscribe=One-Click`; the
confirmation page's button posts the same). Forged, tampered or stale tokens answer 404.
"""

from __future__ import annotations

import html

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from sendkit import unsubscribe
from sendkit.errors import NotFound
from sendkit.web.auth import services_of

router = APIRouter(include_in_schema=False)

# The token is a credential in the URL: keep it out of caches, indexes and Referer headers.
_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'",
}


def _page(status: int, title: str, body: str) -> HTMLResponse:
    document = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem;
color:#222}}button{{font-size:1rem;padding:.6rem 1.2rem;cursor:pointer}}</style>
</head><body><h1>{html.escape(title)}</h1>{body}</body></html>"""
    return HTMLResponse(document, status_code=status, headers=_HEADERS)


def _masked(address: str) -> str:
    local, _, domain = address.partition("@")
    return f"{local[:1]}{'*' * min(max(len(local) - 1, 1), 6)}@{domain}"


def _not_found() -> HTMLResponse:
    return _page(404, "Link not valid", "<p>This unsubscribe link is not valid.</p>")


@router.get("/u/{token}", response_class=HTMLResponse)
async def confirm(token: str, request: Request) -> HTMLResponse:
    services = services_of(request)
    try:
        target = await unsubscribe.find(services.db, services.box, token)
    except NotFound:
        return _not_found()
    who = html.escape(_masked(target.email))
    app = html.escape(target.app_name)
    if target.status == "Unsubscribed":
        return _page(200, "Unsubscribed", f"<p>{who} is not subscribed to {app}.</p>")
    form = (
        f'<form method="post" action="/u/{html.escape(token)}">'
        '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
        "<button type=submit>Unsubscribe</button></form>"
    )
    return _page(200, "Unsubscribe", f"<p>Stop emails from {app} to {who}?</p>{form}")


@router.post("/u/{token}", response_class=HTMLResponse)
async def one_click(token: str, request: Request) -> HTMLResponse:
    services = services_of(request)
    try:
        target = await unsubscribe.unsubscribe(services.db, services.box, token, via="one-click")
    except NotFound:
        return _not_found()
    app = html.escape(target.app_name)
    who = html.escape(_masked(target.email))
    return _page(200, "Unsubscribed", f"<p>{who} will get no more emails from {app}.</p>")
