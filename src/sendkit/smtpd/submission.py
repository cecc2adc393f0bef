"""A submitted MIME message as the `POST /v1/send` payload, so both take one path.

Kept simple on purpose: From, the envelope recipient (with the To header's display name
when it names the same address), Subject, and one body: the text/plain part, or the HTML
part when there is no plain one. SendKit builds, signs and sends its own MIME from these,
as it does for the API; anything it would have to drop (attachments) is refused rather
than lost silently. `X-SendKit-App-Id` plays the API's optional `appId`.
"""

from __future__ import annotations

from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

from sendkit.errors import BadRequest
from sendkit.messages import SendRequest
from sendkit.validation import parse

APP_ID_HEADER = "X-SendKit-App-Id"


def _mailbox(display_name: str, address: str) -> str:
    if not display_name:
        return address
    quoted = display_name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{quoted}" <{address}>'


def _from(message: EmailMessage) -> str:
    header: Any = message["From"]
    addresses: tuple[Any, ...] = getattr(header, "addresses", ()) if header is not None else ()
    if len(addresses) != 1:
        raise BadRequest("Bad request parameters: the message needs exactly one From address")
    return _mailbox(addresses[0].display_name, addresses[0].addr_spec)


def _to(message: EmailMessage, rcpt: str) -> str:
    header: Any = message["To"]
    for address in getattr(header, "addresses", ()) if header is not None else ():
        if address.addr_spec.lower() == rcpt.lower():
            return _mailbox(address.display_name, rcpt)
    return rcpt


def _body(message: EmailMessage) -> str:
    if any(True for _ in message.iter_attachments()):
        raise BadRequest("Bad request parameters: attachments are not supported")
    part = message.get_body(preferencelist=("plain", "html"))
    if part is None:
        raise BadRequest("Bad request parameters: the message has no text or HTML body")
    content = part.get_content()
    if not isinstance(content, str):
        raise BadRequest("Bad request parameters: the body is not text")
    # SMTP carries CRLF; store what an API client would have sent (the builder re-encodes).
    return content.replace("\r\n", "\n")


def to_send_request(raw: bytes, rcpt: str) -> SendRequest:
    """Raises BadRequest (550 5.6.0 over SMTP) naming what is wrong."""
    try:
        message = BytesParser(policy=policy.default).parsebytes(raw)
        assert isinstance(message, EmailMessage)
        fields: dict[str, Any] = {
            "from": _from(message),
            "to": _to(message, rcpt),
            "subject": str(message["Subject"] or ""),
            "body": _body(message),
        }
        app_id = message[APP_ID_HEADER]
    except BadRequest:
        raise
    except Exception as exc:  # the email package raises many kinds on malformed input
        raise BadRequest(f"Bad request parameters: the message cannot be parsed ({exc})") from None
    if not fields["subject"]:
        raise BadRequest("Bad request parameters: 'subject' is required")
    if app_id is not None:
        fields["appId"] = str(app_id).strip()
    return parse(SendRequest, fields)
