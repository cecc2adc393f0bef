"""The aiosmtpd handler: policy only; aiosmtpd owns the protocol.

Two kinds of session share one port:

- **Submission** (after AUTH with an API key as the password): one recipient per
  transaction, so one SMTP message is exactly one `POST /v1/send` and gets one answer.
  MAIL runs the account checks (activation, subscription, rate, SIZE, envelope sender),
  DATA runs `messages.submit` on the parsed message. Errors map through `replies.py`.
- **Inbound** (no AUTH): only our own addresses on a return-path domain are accepted:
  `b+<message id>@…` (bounces, complaints), `unsubscribe+<token>@…` (mailto unsubscribe)
  and `fbl@…` (feedback loops). Any other recipient is refused: never an open relay.
"""

from __future__ import annotations

from typing import Any

from sendkit import accounts, bounces, domains, ids, logs, messages, unsubscribe
from sendkit.accounts import Account, ensure_usable, utc_today
from sendkit.addresses import parse_mailbox
from sendkit.errors import BadRequest, MessageTooLarge, NotFound, SendKitError
from sendkit.keys import AuthenticatedKey
from sendkit.services import Services
from sendkit.smtpd import submission
from sendkit.smtpd.replies import LOCAL_ERROR, reply_for

log = logs.get("sendkit.smtpd")

RELAY_DENIED = "550 5.7.1 Relay access denied: authenticate to send mail"
ONE_RECIPIENT = "452 4.5.3 One recipient per message: send to the others in a new transaction"
MAX_INBOUND_RECIPIENTS = 10


def _size_option(options: list[str]) -> int | None:
    for option in options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return None


class Handler:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.subdomain = services.settings.return_path_subdomain

    # --- MAIL ---------------------------------------------------------------------------

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        if session.authenticated:
            try:
                session.sendkit_account = await self._check_submitter(
                    session.auth_data, address, mail_options
                )
            except SendKitError as exc:
                return reply_for(exc)
            except Exception:
                log.exception("smtpd_mail_failed")
                return LOCAL_ERROR
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def _check_submitter(
        self, key: AuthenticatedKey, address: str, options: list[str]
    ) -> Account:
        """Checks 2 to 4, the announced size, and the envelope sender (7, 8), as early as
        SMTP allows; the From header gets the same checks again in `submit`."""
        services = self.services
        # Fresh from the database: a session may outlive a plan change or a deactivation.
        account = await accounts.load(services.db, key.account.id)
        ensure_usable(account, utc_today())
        await services.limiter.hit(account.id, account.rate_per_second)
        size = _size_option(options)
        if size is not None and size > account.max_message_size:
            raise MessageTooLarge()
        if address:
            try:
                sender = parse_mailbox(address)
            except ValueError as exc:
                raise BadRequest(f"Bad sender address: {exc}") from None
            await domains.check_sender(services.db, account.id, sender)
        return account

    # --- RCPT ---------------------------------------------------------------------------

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if session.authenticated:
            if envelope.rcpt_tos:
                return ONE_RECIPIENT
            try:
                parse_mailbox(address)
            except ValueError:
                return "553 5.1.3 Bad recipient address syntax"
        else:
            reply = await self._inbound_rcpt(address, len(envelope.rcpt_tos))
            if reply is not None:
                return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def _inbound_rcpt(self, address: str, already: int) -> str | None:
        target = bounces.classify_address(address, self.subdomain)
        if target is None:
            return RELAY_DENIED
        if already >= MAX_INBOUND_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        try:
            if target.kind == "unsubscribe" and target.token is not None:
                await unsubscribe.find(self.services.db, self.services.box, target.token)
            elif not await bounces.accepts(self.services.db, target):
                return "550 5.1.1 No such recipient here"
        except NotFound:
            return "550 5.1.1 No such recipient here"
        except SendKitError as exc:
            return reply_for(exc)
        return None

    # --- DATA ---------------------------------------------------------------------------

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw: bytes = envelope.original_content or b""
        try:
            if session.authenticated:
                return await self._submit(session, envelope, raw)
            return await self._inbound(envelope, raw)
        except SendKitError as exc:
            return reply_for(exc)
        except Exception:
            log.exception("smtpd_data_failed")
            return LOCAL_ERROR

    async def _submit(self, session: Any, envelope: Any, raw: bytes) -> str:
        account: Account = getattr(session, "sendkit_account", None) or session.auth_data.account
        request = submission.to_send_request(raw, envelope.rcpt_tos[0])
        if len(raw) > account.max_message_size:
            raise MessageTooLarge()
        request_id = ids.request_id()
        accepted = await messages.submit(self.services.db, account, request, request_id)
        self.services.notify_queued()
        log.info(
            "smtp_submission",
            message_id=accepted.message_id,
            request_id=request_id,
            account_id=account.id,
            status=accepted.status,
        )
        return f"250 2.0.0 OK queued as {accepted.message_id}"

    async def _inbound(self, envelope: Any, raw: bytes) -> str:
        services = self.services
        for rcpt in envelope.rcpt_tos:
            target = bounces.classify_address(rcpt, self.subdomain)
            if target is None:
                continue
            try:
                if target.kind == "unsubscribe" and target.token is not None:
                    await unsubscribe.unsubscribe(
                        services.db, services.box, target.token, via="mailto"
                    )
                    recorded = ["unsubscribed"]
                else:
                    recorded = await bounces.process(services.db, target, raw)
            except NotFound:
                recorded = []
            log.info("smtp_inbound", kind=target.kind, rcpt=rcpt, recorded=recorded)
        return "250 2.0.0 OK"
