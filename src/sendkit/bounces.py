"""Inbound reports about sent messages: DSNs (RFC 3464) and ARF complaints (RFC 5965).

Every message leaves with a VERP return path, `b+<message id>@<return_path_subdomain>.<from
domain>` (see `delivery/worker.return_path`), so a bounce names the message it is about.
The id is 128 random bits: knowing it is what makes a report believable, so nobody can
suppress an address of another account by mailing us a made-up bounce.

Parsing is pure (`parse_report`); recording (`process`) updates the original message,
the suppression list and the event log in one transaction:

    DSN, Action: failed     -> `bounced` (5.x.x: hard, the address is suppressed)
    DSN, Action: delayed    -> `deferred` (informational: the message stays as it is)
    ARF feedback report     -> `complained` (the address is suppressed)
"""

from __future__ import annotations

import email
import re
from dataclasses import dataclass
from email import policy
from email.message import Message
from email.parser import BytesHeaderParser
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from sendkit import events, suppressions, unsubscribe
from sendkit.addresses import normalise_domain
from sendkit.db import Database, domains, messages, now_ms
from sendkit.db import events as events_table
from sendkit.events import EventType

_MESSAGE_ID = re.compile(r"^[0-9a-f]{32}$")
_VERP = re.compile(r"^b\+([0-9a-f]{32})$")
_OUR_MESSAGE_ID_HEADER = re.compile(r"<([0-9a-f]{32})@[^>]+>")
_VERP_IN_TEXT = re.compile(r"\bb\+([0-9a-f]{32})@", re.IGNORECASE)
_SMTP_CODE = re.compile(r"\b([245][0-9][0-9])\b")
FEEDBACK_LOCAL_PART = "fbl"


# --- addresses ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Inbound:
    """What one of our inbound addresses is for."""

    kind: Literal["bounce", "unsubscribe", "feedback"]
    domain: str  # the sending domain (the part after `<return_path_subdomain>.`)
    message_id: str | None = None
    token: str | None = None


def classify_address(address: str, return_path_subdomain: str) -> Inbound | None:
    """Our bounce, unsubscribe and feedback addresses; None for anything else (relaying)."""
    local, _, domain_part = address.strip().strip("<>").rpartition("@")
    if not local or not domain_part:
        return None
    try:
        domain = normalise_domain(domain_part)
    except ValueError:
        return None
    prefix = return_path_subdomain.lower() + "."
    if not domain.startswith(prefix) or len(domain) == len(prefix):
        return None
    sending_domain = domain[len(prefix) :]
    lowered = local.lower()
    verp = _VERP.match(lowered)
    if verp is not None:
        return Inbound("bounce", sending_domain, message_id=verp[1])
    token = unsubscribe.token_from_local_part(lowered)
    if token is not None:
        return Inbound("unsubscribe", sending_domain, token=token)
    if lowered == FEEDBACK_LOCAL_PART:
        return Inbound("feedback", sending_domain)
    return None


async def accepts(db: Database, target: Inbound) -> bool:
    """Whether a bounce or feedback address names something we sent (checked at RCPT)."""
    async with db.read() as conn:
        if target.kind == "bounce" and target.message_id is not None:
            original = await _original(conn, target.message_id)
            return original is not None and _domain_of(original.from_addr) == target.domain
        if target.kind == "feedback":
            found = await conn.scalar(
                sa.select(domains.c.id).where(domains.c.name == target.domain).limit(1)
            )
            return found is not None
    return False


# --- parsing (pure) -----------------------------------------------------------------------


@dataclass(frozen=True)
class RecipientStatus:
    action: str  # failed | delayed | delivered | relayed | expanded
    status: str  # e.g. 5.1.1
    recipient: str | None
    diagnostic: str | None
    remote_mta: str | None

    @property
    def hard(self) -> bool:
        return self.status.startswith("5")

    @property
    def smtp_code(self) -> int | None:
        found = _SMTP_CODE.search(self.diagnostic or "")
        return int(found[1]) if found else None


@dataclass(frozen=True)
class Report:
    kind: Literal["dsn", "arf", "other"]
    recipients: tuple[RecipientStatus, ...] = ()
    feedback_type: str | None = None
    user_agent: str | None = None
    # Ids of our messages found in the report's copy of the original (its Message-ID or
    # VERP return path): how a feedback-loop report that was not sent to VERP is matched.
    original_ids: tuple[str, ...] = ()

    def first(self, action: str) -> RecipientStatus | None:
        return next((r for r in self.recipients if r.action == action), None)


def _field(block: Message, name: str) -> str | None:
    value = block.get(name)
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text or None


def _typed_value(value: str | None) -> str | None:
    """`rfc822; user@example.com` -> `user@example.com` (RFC 3464 address and diagnostic
    types)."""
    if value is None:
        return None
    kind, sep, rest = value.partition(";")
    return rest.strip() if sep and kind.strip().isalnum() else value


def _blocks(part: Message) -> list[Message]:
    """The header blocks of a message/delivery-status or message/feedback-report part."""
    payload = part.get_payload()
    if isinstance(payload, list) and all(isinstance(p, Message) for p in payload):
        return list(payload)
    raw = part.get_payload(decode=True)
    data = raw if isinstance(raw, bytes) else str(payload or "").encode("utf-8", "replace")
    chunks = re.split(rb"\r?\n[ \t]*\r?\n", data.strip())
    parser = BytesHeaderParser()
    return [parser.parsebytes(chunk + b"\n\n") for chunk in chunks if chunk.strip()]


def _recipients(part: Message) -> tuple[RecipientStatus, ...]:
    found = []
    for block in _blocks(part):
        action = _field(block, "Action")
        if action is None:
            continue  # the per-message block
        found.append(
            RecipientStatus(
                action=action.lower(),
                status=(_field(block, "Status") or "").split(" ")[0],
                recipient=_typed_value(
                    _field(block, "Final-Recipient") or _field(block, "Original-Recipient")
                ),
                diagnostic=_typed_value(_field(block, "Diagnostic-Code")),
                remote_mta=_typed_value(_field(block, "Remote-MTA")),
            )
        )
    return tuple(found)


def _original_ids(report: Message) -> tuple[str, ...]:
    ids: list[str] = []
    for part in report.walk():
        kind = part.get_content_type()
        if kind == "message/rfc822":
            payload = part.get_payload()
            inner = (
                [p for p in payload if isinstance(p, Message)] if isinstance(payload, list) else []
            )
            headers_text = "".join(f"{k}: {v}\n" for sub in inner for k, v in sub.items())
        elif kind == "text/rfc822-headers":
            raw = part.get_payload(decode=True)
            headers_text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else ""
        else:
            continue
        for regex in (_OUR_MESSAGE_ID_HEADER, _VERP_IN_TEXT):
            for found in regex.findall(headers_text):
                if found.lower() not in ids:
                    ids.append(found.lower())
    return tuple(ids)


def parse_report(raw: bytes) -> Report:
    """Recognise a DSN or an ARF report; anything else (auto-replies, free-text bounces)
    is `other`, and recorded as nothing: a wrong suppression is worse than a missed one."""
    try:
        message = email.message_from_bytes(raw, policy=policy.compat32)
    except Exception:
        return Report("other")
    if message.get_content_type() != "multipart/report":
        return Report("other")
    report_type = str(message.get_param("report-type", "") or "").lower()
    parts = [p for p in message.walk() if p is not message]
    if report_type == "feedback-report":
        feedback = next(
            (p for p in parts if p.get_content_type() == "message/feedback-report"), None
        )
        if feedback is None:
            return Report("other")
        fields = _blocks(feedback)
        first = fields[0] if fields else Message()
        return Report(
            "arf",
            feedback_type=(_field(first, "Feedback-Type") or "abuse").lower(),
            user_agent=_field(first, "User-Agent"),
            original_ids=_original_ids(message),
        )
    if report_type == "delivery-status":
        status = next((p for p in parts if p.get_content_type() == "message/delivery-status"), None)
        if status is None:
            return Report("other")
        return Report("dsn", recipients=_recipients(status), original_ids=_original_ids(message))
    return Report("other")


# --- recording ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Original:
    id: str
    account_id: str
    to_addr: str
    from_addr: str
    status: str


def _domain_of(address: str) -> str:
    return normalise_domain(address.rpartition("@")[2])


async def _original(conn: AsyncConnection, message_id: str) -> _Original | None:
    if not _MESSAGE_ID.match(message_id):
        return None
    row = (
        await conn.execute(
            sa.select(
                messages.c.id,
                messages.c.account_id,
                messages.c.to_addr,
                messages.c.from_addr,
                messages.c.status,
            ).where(messages.c.id == message_id)
        )
    ).first()
    return None if row is None else _Original(**row._mapping)


async def _already(conn: AsyncConnection, message_id: str, type_: EventType) -> bool:
    found = await conn.scalar(
        sa.select(events_table.c.id)
        .where(events_table.c.message_id == message_id, events_table.c.type == type_.value)
        .limit(1)
    )
    return found is not None


async def process(db: Database, target: Inbound, raw: bytes) -> list[str]:
    """Record what a report says about the message it names; returns the event types
    recorded (empty for reports that say nothing we act on, or that repeat one)."""
    report = parse_report(raw)
    if report.kind == "other":
        return []
    candidates = [target.message_id] if target.message_id else list(report.original_ids)
    async with db.begin() as conn:
        for message_id in candidates:
            original = await _original(conn, message_id)
            if original is None or _domain_of(original.from_addr) != target.domain:
                continue
            if report.kind == "arf":
                return await _complaint(conn, original, report)
            return await _dsn(conn, original, report)
    return []


async def _complaint(conn: AsyncConnection, original: _Original, report: Report) -> list[str]:
    await suppressions.add(
        conn, original.account_id, original.to_addr, suppressions.Reason.COMPLAINT.value
    )
    if await _already(conn, original.id, EventType.COMPLAINED):
        return []
    data = {
        "email": original.to_addr,
        "feedbackType": report.feedback_type,
        "userAgent": report.user_agent,
        "source": "arf",
    }
    await events.record(conn, original.account_id, original.id, EventType.COMPLAINED, data)
    return [EventType.COMPLAINED.value]


async def _dsn(conn: AsyncConnection, original: _Original, report: Report) -> list[str]:
    failed = report.first("failed")
    if failed is not None:
        return await _bounce(conn, original, failed)
    delayed = report.first("delayed")
    if delayed is not None:
        data = _dsn_data(original, delayed)
        await events.record(conn, original.account_id, original.id, EventType.DEFERRED, data)
        return [EventType.DEFERRED.value]
    return []


def _dsn_data(original: _Original, status: RecipientStatus) -> dict[str, Any]:
    return {
        "email": original.to_addr,
        "status": status.status,
        "code": status.smtp_code,
        "text": (status.diagnostic or "")[:500],
        "host": status.remote_mta,
        "hard": status.hard,
        "source": "dsn",
    }


async def _bounce(conn: AsyncConnection, original: _Original, failed: RecipientStatus) -> list[str]:
    if original.status == "bounced" and await _already(conn, original.id, EventType.BOUNCED):
        return []  # the same bounce again
    await conn.execute(
        messages.update()
        .where(messages.c.id == original.id)
        .values(
            status="bounced",
            last_code=failed.smtp_code,
            last_text=(failed.diagnostic or f"DSN status {failed.status}")[:2000],
            updated_at=now_ms(),
        )
    )
    if failed.hard:
        await suppressions.add(
            conn, original.account_id, original.to_addr, suppressions.Reason.HARD_BOUNCE.value
        )
    data = _dsn_data(original, failed)
    await events.record(conn, original.account_id, original.id, EventType.BOUNCED, data)
    return [EventType.BOUNCED.value]
