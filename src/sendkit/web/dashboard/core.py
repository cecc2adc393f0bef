"""What every dashboard page shares: the route class (session, CSRF, errors, security
headers), the per-request `Page`, templates, flash messages and cookies.

Views stay thin: they parse a form, call one domain function, and render or redirect.
Domain errors become page messages here or in the view, never JSON envelopes.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.datastructures import FormData, UploadFile
from starlette.responses import HTMLResponse, RedirectResponse, Response

from sendkit import __version__, logs, system_mail, users
from sendkit.accounts import Account, utc_today
from sendkit.errors import NotFound, SendKitError
from sendkit.message_log import Viewer
from sendkit.services import Services
from sendkit.web.auth import services_of

log = logs.get("sendkit.dashboard")

SESSION_COOKIE = "sendkit_session"
ANON_COOKIE = "sendkit_csrf"
FLASH_COOKIE = "sendkit_flash"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
STATIC_DIR = Path(__file__).parent / "static"

PAGE_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "frame-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; "
    "object-src 'none'"
)


# --- errors that become pages -----------------------------------------------------------


class PageError(Exception):
    status = 400
    title = "Something is not right"

    def __init__(self, message: str = "") -> None:
        self.message = message
        super().__init__(message)


class LoginRequired(PageError):
    status = 401
    title = "Please log in"


class PageNotFound(PageError):
    status = 404
    title = "Page not found"


class CsrfRejected(PageError):
    status = 403
    title = "This form has expired"


# --- the request's page context ---------------------------------------------------------


@dataclass
class Page:
    request: Request
    services: Services
    session: users.Session | None
    csrf_token: str
    new_anon_token: str | None = None
    incoming_flash: list[dict[str, str]] = field(default_factory=list)
    outgoing_flash: list[dict[str, str]] = field(default_factory=list)
    flash_shown: bool = False
    cookies: list[Callable[[Response], None]] = field(default_factory=list)

    @property
    def signed_in(self) -> users.Session:
        if self.session is None:
            raise LoginRequired()
        return self.session

    @property
    def account(self) -> Account:
        return self.signed_in.account

    @property
    def account_id(self) -> str:
        return self.signed_in.account.id

    @property
    def is_htmx(self) -> bool:
        return self.request.headers.get("hx-request") == "true"

    def flash(self, message: str, level: str = "success") -> None:
        self.outgoing_flash.append({"level": level, "message": message})

    async def viewer(self) -> Viewer:
        """Whose messages the signed-in user may read: the account's, and SendKit's own
        emails to the user (an instance operator reads all of those, e.g. to pass a reset
        link on when the server runs in sandbox mode)."""
        session = self.signed_in
        system_id = await system_mail.system_account_id(self.services)
        return Viewer(
            session.account.id,
            session.user.email,
            system_id,
            all_system_mail=session.user.is_operator,
        )


def page_of(request: Request) -> Page:
    """FastAPI dependency: the page context the route class prepared."""
    return request.state.page  # type: ignore[no-any-return]


def signed_in(request: Request) -> Page:
    """FastAPI dependency: the page of a signed-in user, or a redirect to the login."""
    page = page_of(request)
    _ = page.signed_in
    return page


def operator(request: Request) -> Page:
    """FastAPI dependency: instance operators only; anyone else sees 'not found'."""
    page = signed_in(request)
    if not page.signed_in.user.is_operator:
        raise PageNotFound()
    return page


# --- templates --------------------------------------------------------------------------


def _format_ts(ms: int | None) -> str:
    if not ms:
        return "—"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _iso_ts(ms: int | None) -> str:
    return dt.datetime.fromtimestamp((ms or 0) / 1000, dt.UTC).isoformat()


def _ago(ms: int | None) -> str:
    if not ms:
        return "never"
    seconds = max(0, int(dt.datetime.now(dt.UTC).timestamp() - ms / 1000))
    for unit, size in (("day", 86_400), ("hour", 3_600), ("minute", 60)):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


def _size(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{int(value)} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value} GB"


def _number(n: int | None) -> str:
    return f"{n or 0:,}"


def _asset_version() -> str:
    digest = hashlib.sha256(__version__.encode())
    for path in sorted(STATIC_DIR.iterdir()):
        digest.update(path.name.encode() + str(path.stat().st_mtime_ns).encode())
    return digest.hexdigest()[:10]


def _build_env() -> Environment:
    env = Environment(
        loader=PackageLoader("sendkit.web.dashboard", "templates"),
        autoescape=select_autoescape(["html", "svg"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(ts=_format_ts, iso=_iso_ts, ago=_ago, size=_size, number=_number)
    env.globals["asset_version"] = _asset_version()
    env.globals["version"] = __version__
    return env


_env: Environment | None = None


def templates() -> Environment:
    global _env
    if _env is None:
        _env = _build_env()
    return _env


def render(
    page: Page,
    template: str,
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    **context: Any,
) -> HTMLResponse:
    """A full page (or an htmx fragment: a template whose name starts with `_`)."""
    fragment = Path(template).name.startswith("_")
    if not fragment:
        page.flash_shown = True
    values = {
        "page": page,
        "session": page.session,
        "csrf_token": page.csrf_token,
        "flashes": [] if fragment else page.incoming_flash + page.outgoing_flash,
        "settings": page.services.settings,
        "path": page.request.url.path,
        "today_iso": utc_today().isoformat(),
    }
    html = templates().get_template(template).render(values | context)
    return HTMLResponse(html, status_code=status, headers=dict(headers or {}))


def redirect(page: Page, url: str, message: str | None = None, level: str = "success") -> Response:
    """After a form: go to `url` (htmx too), with an optional flash message there."""
    if message:
        page.flash(message, level)
    if page.is_htmx:
        return Response(status_code=200, headers={"HX-Redirect": url})
    return RedirectResponse(url, status_code=303)


def safe_next(value: str | None, default: str = "/") -> str:
    """Only local paths: `//host` and `/\\host` would leave the site."""
    if not value or not value.startswith("/") or value.startswith(("//", "/\\")):
        return default
    return value


# --- forms ------------------------------------------------------------------------------


async def form_of(request: Request) -> FormData:
    return await request.form()


def text(form: FormData, name: str, limit: int = 10_000) -> str:
    value = form.get(name)
    if value is None or isinstance(value, UploadFile):
        return ""
    return value[:limit]


def checked(form: FormData, name: str) -> bool:
    return text(form, name) in ("on", "true", "1", "yes")


def upload(form: FormData, name: str) -> UploadFile | None:
    value = form.get(name)
    return value if isinstance(value, UploadFile) and value.filename else None


def error_message(exc: SendKitError) -> str:
    """A domain error as a sentence for a page."""
    return exc.message.removeprefix("Bad request parameters: ").strip()


# --- cookies and flash ------------------------------------------------------------------


def _is_https(request: Request) -> bool:
    return request.url.scheme == "https"


def set_session_cookie(page: Page, token: str, max_age: int) -> None:
    secure = _is_https(page.request)

    def apply(response: Response) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            token,
            max_age=max_age,
            httponly=True,
            samesite="lax",
            secure=secure,
            path="/",
        )

    page.cookies.append(apply)


def clear_session_cookie(page: Page) -> None:
    secure = _is_https(page.request)
    page.cookies.append(
        lambda r: r.delete_cookie(
            SESSION_COOKIE, path="/", httponly=True, samesite="lax", secure=secure
        )
    )


def _flash_cookie(services: Services, items: list[dict[str, str]]) -> str:
    payload = base64.urlsafe_b64encode(json.dumps(items[:5]).encode()).decode()
    return payload + "." + services.box.mac("flash", payload)


def _read_flash(services: Services, value: str | None) -> list[dict[str, str]]:
    if not value or "." not in value:
        return []
    payload, mac = value.rsplit(".", 1)
    if not hmac.compare_digest(mac, services.box.mac("flash", payload)):
        return []
    try:
        items = json.loads(base64.urlsafe_b64decode(payload.encode()))
    except ValueError:
        return []
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _finish_cookies(page: Page, response: Response) -> None:
    secure = _is_https(page.request)
    if page.new_anon_token:
        response.set_cookie(
            ANON_COOKIE, page.new_anon_token, httponly=True, samesite="lax", secure=secure
        )
    if page.outgoing_flash and not page.flash_shown:
        value = _flash_cookie(page.services, page.outgoing_flash)
        response.set_cookie(FLASH_COOKIE, value, httponly=True, samesite="lax", secure=secure)
    elif page.flash_shown and page.incoming_flash:
        response.delete_cookie(FLASH_COOKIE, httponly=True, samesite="lax", secure=secure)
    for apply in page.cookies:
        apply(response)


# --- the route class --------------------------------------------------------------------


def anon_csrf(services: Services, anon: str) -> str:
    return services.box.mac("anon-csrf", anon)


async def open_page(request: Request) -> Page:
    services = services_of(request)
    token = request.cookies.get(SESSION_COOKIE, "")
    session = await users.load_session(services.db, token) if token else None
    page = Page(request, services, session, "")
    if session is not None:
        page.csrf_token = session.csrf_token
    else:
        anon = request.cookies.get(ANON_COOKIE, "")
        if len(anon) < 20 or len(anon) > 100:
            anon = page.new_anon_token = secrets.token_urlsafe(32)
        page.csrf_token = anon_csrf(services, anon)
    page.incoming_flash = _read_flash(services, request.cookies.get(FLASH_COOKIE))
    return page


async def _check_csrf(page: Page) -> None:
    request = page.request
    if request.method not in UNSAFE_METHODS:
        return
    if page.new_anon_token:
        raise CsrfRejected("Your browser did not send the form's cookie.")
    sent = request.headers.get("x-csrf-token") or text(await request.form(), "csrf_token")
    if not sent or not hmac.compare_digest(sent, page.csrf_token):
        raise CsrfRejected()


def security_headers(response: Response) -> None:
    headers = response.headers
    headers.setdefault("Content-Security-Policy", PAGE_CSP)
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "same-origin")
    headers.setdefault("Cache-Control", "no-store")


def error_page(page: Page, exc: PageError) -> Response:
    if isinstance(exc, LoginRequired):
        target = page.request.url.path
        if page.request.url.query:
            target += "?" + page.request.url.query
        url = "/login" if page.request.method != "GET" else f"/login?next={quote(target)}"
        return redirect(page, url)
    return render(page, "error.html", status=exc.status, title=exc.title, message=exc.message)


def _domain_error_page(page: Page, exc: SendKitError) -> Response:
    if isinstance(exc, NotFound):
        return error_page(page, PageNotFound())
    if exc.status >= 500:
        log.warning("dashboard_error", code=exc.code, message=exc.message)
    response = render(
        page, "error.html", status=exc.status, title="That did not work", message=error_message(exc)
    )
    response.headers.update(exc.headers)
    return response


class PageRoute(APIRoute):
    """Every dashboard route: opens the page context, checks CSRF on unsafe methods,
    turns errors into pages, and adds cookies and security headers to the response."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        original = super().get_route_handler()

        async def handler(request: Request) -> Response:
            page = await open_page(request)
            request.state.page = page
            try:
                await _check_csrf(page)
                response = await original(request)
            except PageError as exc:
                response = error_page(page, exc)
            except SendKitError as exc:
                response = _domain_error_page(page, exc)
            except RequestValidationError:
                response = error_page(page, PageError("Some of the values sent are not valid."))
            finally:
                await request.close()  # the uploaded files of a form, if any
            _finish_cookies(page, response)
            security_headers(response)
            return response

        return handler
