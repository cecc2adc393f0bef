"""Sign up, log in and out, activation, password reset."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from sendkit import system_mail, users
from sendkit.errors import InvalidToken, RateLimited, SendKitError
from sendkit.web.dashboard.core import (
    SESSION_COOKIE,
    Page,
    PageNotFound,
    PageRoute,
    clear_session_cookie,
    error_message,
    form_of,
    page_of,
    redirect,
    render,
    safe_next,
    set_session_cookie,
    signed_in,
    text,
)

router = APIRouter(route_class=PageRoute, include_in_schema=False)

_SIGNUPS_PER_MINUTE = 5
_RESETS_PER_MINUTE = 3
_IP_LOGINS_PER_MINUTE = 30


def _client(page: Page) -> str:
    client = page.request.client
    return client.host if client is not None else "unknown"


async def _log_in(page: Page, user: users.User) -> None:
    """A new session id for this login (never the one the browser came with)."""
    hours = page.services.settings.session_hours
    new = await users.start_session(
        page.services.db,
        user.id,
        hours * 3_600_000,
        replaces=page.request.cookies.get(SESSION_COOKIE),
    )
    set_session_cookie(page, new.token, hours * 3600)


# --- sign up ----------------------------------------------------------------------------


def _signup_enabled(page: Page) -> None:
    if not page.services.settings.signup_enabled:
        raise PageNotFound("Sign-up is closed on this server: ask its operator for an account.")


@router.get("/signup")
async def signup_form(page: Page = Depends(page_of)) -> Response:
    _signup_enabled(page)
    if page.session is not None:
        return redirect(page, "/")
    return render(page, "signup.html", account_name="", email="", error=None)


@router.post("/signup")
async def signup(request: Request, page: Page = Depends(page_of)) -> Response:
    _signup_enabled(page)
    form = await form_of(request)
    name, email = text(form, "account_name", 200), text(form, "email", 320)
    services = page.services
    try:
        await users.Throttle(services.limiter, "signup", _SIGNUPS_PER_MINUTE).hit(_client(page))
        created = await users.signup(services.db, name, email, text(form, "password", 2000))
    except SendKitError as exc:
        status = exc.status if isinstance(exc, RateLimited) else 400
        return render(
            page,
            "signup.html",
            status=status,
            account_name=name,
            email=email,
            error=error_message(exc),
        )
    await _log_in(page, created.user)
    try:
        await system_mail.send_activation(services, created.user, name.strip())
    except SendKitError as exc:
        page.flash(f"The activation email could not be sent: {error_message(exc)}", "error")
    where = "your Sandbox inbox" if services.settings.delivery == "sandbox" else "your inbox"
    return redirect(
        page,
        "/",
        f"Welcome to SendKit! We sent an activation link to {created.user.email}: "
        f"find it in {where}.",
    )


# --- log in and out ---------------------------------------------------------------------


@router.get("/login")
async def login_form(page: Page = Depends(page_of)) -> Response:
    target = safe_next(page.request.query_params.get("next"))
    if page.session is not None:
        return redirect(page, target)
    return render(page, "login.html", email="", next=target, error=None)


@router.post("/login")
async def login(request: Request, page: Page = Depends(page_of)) -> Response:
    form = await form_of(request)
    email, target = text(form, "email", 320).strip(), safe_next(text(form, "next"))
    services = page.services
    per_minute = services.settings.login_attempts_per_minute
    try:
        await users.Throttle(services.limiter, "login", per_minute).hit(
            email.lower(), _client(page)
        )
        await users.Throttle(services.limiter, "login-ip", _IP_LOGINS_PER_MINUTE).hit(_client(page))
        user = await users.authenticate(services.db, email, text(form, "password", 2000))
    except SendKitError as exc:
        response = render(
            page,
            "login.html",
            status=exc.status,
            email=email,
            next=target,
            error=error_message(exc),
        )
        response.headers.update(exc.headers)
        return response
    await _log_in(page, user)
    return redirect(page, target)


@router.post("/logout")
async def logout(page: Page = Depends(page_of)) -> Response:
    token = page.request.cookies.get(SESSION_COOKIE)
    if token:
        await users.end_session(page.services.db, token)
    clear_session_cookie(page)
    return redirect(page, "/login", "You are logged out.")


# --- activation -------------------------------------------------------------------------


@router.get("/activate")
async def activate(page: Page = Depends(page_of)) -> Response:
    token = page.request.query_params.get("token", "")
    services = page.services
    try:
        user = await users.activate(services.db, services.box, token)
    except InvalidToken as exc:
        expired = "It is incomplete or has expired. Log in and ask for a new one from the banner "
        expired += "at the top of the dashboard."
        message = expired if exc.message == InvalidToken().message else exc.message + "."
        return render(
            page,
            "error.html",
            status=400,
            title="This activation link does not work",
            message=message,
        )
    if page.session is not None and page.session.user.id == user.id:
        return redirect(page, "/", "Your account is active: the API accepts your keys now.")
    return render(page, "activated.html", email=user.email)


@router.post("/activate/resend")
async def resend_activation(page: Page = Depends(signed_in)) -> Response:
    session = page.signed_in
    if session.account.active:
        return redirect(page, "/", "Your account is already active.", "info")
    if session.account.deactivated:
        return redirect(page, "/", "An instance operator deactivated this account.", "error")
    services = page.services
    try:
        await users.Throttle(services.limiter, "activation", _RESETS_PER_MINUTE).hit(
            session.user.id
        )
        await system_mail.send_activation(services, session.user, session.account.name)
    except SendKitError as exc:
        return redirect(page, "/", error_message(exc), "error")
    return redirect(page, "/", f"We sent a new activation link to {session.user.email}.")


# --- password reset ---------------------------------------------------------------------


@router.get("/forgot")
async def forgot_form(page: Page = Depends(page_of)) -> Response:
    return render(page, "forgot.html", email="", sent=False, error=None)


@router.post("/forgot")
async def forgot(request: Request, page: Page = Depends(page_of)) -> Response:
    form = await form_of(request)
    email = text(form, "email", 320).strip()
    services = page.services
    try:
        await users.Throttle(services.limiter, "reset", _RESETS_PER_MINUTE).hit(
            email.lower(), _client(page)
        )
        address = users.normalise_email(email)
    except SendKitError as exc:
        return render(
            page,
            "forgot.html",
            status=exc.status,
            email=email,
            sent=False,
            error=error_message(exc),
        )
    user = await users.find_by_email(services.db, address)
    if user is not None:
        await system_mail.send_reset(services, user)
    # The same answer whether or not the address has an account.
    return render(page, "forgot.html", email=address, sent=True, error=None)


@router.get("/reset")
async def reset_form(page: Page = Depends(page_of)) -> Response:
    token = page.request.query_params.get("token", "")
    services = page.services
    try:
        user = await users.check_reset_token(services.db, services.box, token)
    except InvalidToken:
        return _bad_reset_link(page)
    return render(page, "reset.html", token=token, email=user.email, error=None)


def _bad_reset_link(page: Page) -> Response:
    return render(
        page,
        "error.html",
        status=400,
        title="This reset link does not work",
        message="It is incomplete, was already used, or has expired. Ask for a new one from "
        "the log-in page (“Forgot your password?”).",
    )


@router.post("/reset")
async def reset(request: Request, page: Page = Depends(page_of)) -> Response:
    form = await form_of(request)
    token, password = text(form, "token", 300), text(form, "password", 2000)
    services = page.services
    try:
        user = await users.check_reset_token(services.db, services.box, token)
    except InvalidToken:
        return _bad_reset_link(page)
    if password != text(form, "confirm", 2000):
        return render(
            page,
            "reset.html",
            status=400,
            token=token,
            email=user.email,
            error="The two passwords are not the same.",
        )
    try:
        await users.reset_password(services.db, services.box, token, password)
    except InvalidToken:
        return _bad_reset_link(page)
    except SendKitError as exc:
        return render(
            page,
            "reset.html",
            status=400,
            token=token,
            email=user.email,
            error=error_message(exc),
        )
    clear_session_cookie(page)
    return redirect(page, "/login", "Your password is changed: log in with the new one.")
