"""Emails SendKit sends on its own behalf: account activation and password reset.

They go through the same road as every customer's email: `messages.submit()` from the
instance's system account (`accounts.is_system`), whose domain is the one of
`Settings.system_from`, verified, with any sender allowed. So they are queued, signed,
retried and logged like any other message, and in sandbox mode they land in the sandbox
inbox, where the dashboard shows each user the ones addressed to them.
"""

from __future__ import annotations

import html

from sendkit import accounts, domains, ids, messages, users
from sendkit.accounts import Account
from sendkit.addresses import parse_mailbox
from sendkit.db import now_ms
from sendkit.services import Services

_SYSTEM_DAILY_LIMIT = 1_000_000
_EXTRA_KEY = "system_account_id"


async def system_account(services: Services) -> Account:
    """The system account, created on first use, with its sending domain ready."""
    account_id = services.extras.get(_EXTRA_KEY)
    if account_id is None:
        account_id = await accounts.find_system(services.db)
        if account_id is None:
            account_id = await accounts.create(
                services.db,
                "SendKit system",
                active=True,
                is_system=True,
                daily_limit=_SYSTEM_DAILY_LIMIT,
            )
        # Idempotent: also follows a change of `system_from` between starts.
        domain = parse_mailbox(services.settings.system_from).ascii_domain
        await domains.add(
            services.db,
            services.box,
            account_id,
            domain,
            verified=True,
            selector=services.settings.dkim_selector,
        )
        await domains.add_sender(services.db, account_id, f"{domains.ANY_SENDER}@{domain}")
        services.extras[_EXTRA_KEY] = account_id
    return await accounts.load(services.db, account_id)


async def system_account_id(services: Services) -> str | None:
    """The system account's id if it exists (without creating it)."""
    cached = services.extras.get(_EXTRA_KEY)
    return str(cached) if cached else await accounts.find_system(services.db)


async def send(services: Services, to: str, subject: str, body_html: str) -> str:
    """Queue one email from `system_from`; returns its message id."""
    account = await system_account(services)
    request = messages.SendRequest.model_validate(
        {"from": services.settings.system_from, "to": to, "subject": subject, "body": body_html}
    )
    accepted = await messages.submit(services.db, account, request, ids.request_id())
    services.notify_queued()
    return accepted.message_id


def _layout(title: str, paragraphs: list[str], link: str, button: str, footer: str) -> str:
    url = html.escape(link, quote=True)
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    return (
        '<div style="font-family:system-ui,sans-serif;max-width:560px;margin:0 auto;'
        'color:#1f2937;line-height:1.5">'
        f'<h1 style="font-size:20px">{html.escape(title)}</h1>{body}'
        f'<p><a href="{url}" style="display:inline-block;background:#2563eb;color:#ffffff;'
        f'padding:10px 18px;border-radius:6px;text-decoration:none">{html.escape(button)}</a></p>'
        f'<p style="font-size:13px;color:#6b7280">Or open this address: {url}</p>'
        f'<p style="font-size:13px;color:#6b7280">{html.escape(footer)}</p></div>'
    )


def activation_email(account_name: str, link: str, hours: int) -> tuple[str, str]:
    subject = "Activate your SendKit account"
    body = _layout(
        "Welcome to SendKit",
        [
            f"You created the account <strong>{html.escape(account_name)}</strong>.",
            "Until it is activated the API answers code 100049. Follow this link to activate it:",
        ],
        link,
        "Activate my account",
        f"The link works for {hours} hours. If you did not sign up, ignore this email.",
    )
    return subject, body


def reset_email(link: str, minutes: int) -> tuple[str, str]:
    subject = "Reset your SendKit password"
    body = _layout(
        "Reset your password",
        ["Someone (we hope you) asked to reset the password of your SendKit login."],
        link,
        "Choose a new password",
        f"The link works for {minutes} minutes and only once. If you did not ask for it, "
        "ignore this email: your password stays as it is.",
    )
    return subject, body


async def send_activation(services: Services, user: users.User, account_name: str) -> str:
    """The activation link for a new account's owner; returns the message id."""
    settings = services.settings
    expires = now_ms() + settings.activation_hours * 3_600_000
    token = users.activation_token(services.box, user, expires)
    link = f"{settings.public_url()}/activate?token={token}"
    subject, body = activation_email(account_name, link, settings.activation_hours)
    return await send(services, user.email, subject, body)


async def send_reset(services: Services, user: users.User) -> str:
    """A password reset link; it stops working once the password changes."""
    settings = services.settings
    expires = now_ms() + settings.reset_minutes * 60_000
    token = users.reset_token(services.box, user, expires)
    link = f"{settings.public_url()}/reset?token={token}"
    subject, body = reset_email(link, settings.reset_minutes)
    return await send(services, user.email, subject, body)
