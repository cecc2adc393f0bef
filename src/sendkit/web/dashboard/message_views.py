"""The message log, one message (headers, parts, source, attempts), and the sandbox inbox.

An email's HTML is never part of a dashboard page: it is served alone, from its own URL,
with a Content-Security-Policy that allows no script, no remote load and no form, and that
sandboxes it (an opaque origin) even when opened directly; the page shows it in an
`<iframe sandbox>` without `allow-scripts` or `allow-same-origin`.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from starlette.responses import HTMLResponse, Response

from sendkit import message_log
from sendkit.message_log import LogFilter
from sendkit.web.dashboard.core import Page, PageRoute, render, signed_in

router = APIRouter(route_class=PageRoute, include_in_schema=False)

EMAIL_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; font-src data:; "
    "form-action 'none'; base-uri 'none'; frame-ancestors 'self'; "
    "sandbox allow-popups allow-popups-to-escape-sandbox"
)
# Links in an email open in a new tab (the frame itself cannot be navigated away).
_EMAIL_PREFIX = '<!doctype html><meta charset="utf-8"><base target="_blank">'
# Belt and braces: a sandboxed frame already ignores these, the policy cannot stop them.
_AUTO_NAVIGATION = re.compile(r"<meta\b[^>]*http-equiv\s*=\s*[\"']?\s*refresh[^>]*>", re.I)


def email_document(html: str) -> str:
    """The HTML part as the frame gets it: no automatic navigation, links in new tabs."""
    return _EMAIL_PREFIX + _AUTO_NAVIGATION.sub("", html)


def _date(value: str | None) -> dt.date | None:
    try:
        return dt.date.fromisoformat(value) if value else None
    except ValueError:
        return None


def _page_no(value: str | None) -> int:
    return max(1, min(int(value), 100_000)) if value and value.isdigit() else 1


def _filter_of(request: Request) -> LogFilter:
    params = request.query_params
    status = params.get("status", "")
    return LogFilter(
        status=status if status in message_log.STATUSES else None,
        since=_date(params.get("since")),
        until=_date(params.get("until")),
        q=(params.get("q") or "").strip()[:320] or None,
        page=_page_no(params.get("page")),
    )


def _query(f: LogFilter, page: int) -> str:
    values: dict[str, Any] = {
        "status": f.status or "",
        "since": f.since.isoformat() if f.since else "",
        "until": f.until.isoformat() if f.until else "",
        "q": f.q or "",
        "page": page if page > 1 else "",
    }
    return urlencode({k: v for k, v in values.items() if v != ""})


@router.get("/messages")
async def message_list(request: Request, page: Page = Depends(signed_in)) -> Response:
    f = _filter_of(request)
    result = await message_log.search(page.services.db, page.account_id, f)
    filtered = bool(f.status or f.since or f.until or f.q)
    return render(
        page,
        "messages.html",
        f=f,
        result=result,
        filtered=filtered,
        statuses=message_log.STATUSES,
        prev_query=_query(f, f.page - 1),
        next_query=_query(f, f.page + 1),
    )


async def _view(page: Page, message_id: str) -> message_log.MessageView:
    return await message_log.get(page.services.db, await page.viewer(), message_id)


def _detail(page: Page, view: message_log.MessageView, *, inbox: bool) -> Response:
    base = "/inbox" if inbox else "/messages"
    return render(
        page,
        "message.html",
        m=view.row,
        view=view,
        inbox=inbox,
        base=base,
        raw_text=view.raw.decode("utf-8", "replace"),
    )


@router.get("/messages/{message_id}")
async def message_detail(message_id: str, page: Page = Depends(signed_in)) -> Response:
    return _detail(page, await _view(page, message_id), inbox=False)


@router.get("/messages/{message_id}/body")
async def message_body(message_id: str, page: Page = Depends(signed_in)) -> Response:
    """The HTML part alone, for the sandboxed frame."""
    view = await _view(page, message_id)
    return HTMLResponse(
        email_document(view.html or ""),
        headers={
            "Content-Security-Policy": EMAIL_CSP,
            "X-Frame-Options": "SAMEORIGIN",
            "X-DNS-Prefetch-Control": "off",
            "Cache-Control": "no-store",
        },
    )


@router.get("/messages/{message_id}/raw")
async def message_raw(message_id: str, page: Page = Depends(signed_in)) -> Response:
    """The source as a download (.eml), never rendered."""
    view = await _view(page, message_id)
    return Response(
        view.raw,
        media_type="message/rfc822",
        headers={"Content-Disposition": f'attachment; filename="{view.row["id"]}.eml"'},
    )


@router.get("/inbox")
async def inbox_list(request: Request, page: Page = Depends(signed_in)) -> Response:
    page_no = _page_no(request.query_params.get("page"))
    result = await message_log.inbox_page(page.services.db, await page.viewer(), page_no)
    return render(page, "inbox.html", result=result)


@router.get("/inbox/{message_id}")
async def inbox_detail(message_id: str, page: Page = Depends(signed_in)) -> Response:
    return _detail(page, await _view(page, message_id), inbox=True)
