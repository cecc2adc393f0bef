"""The one map from domain errors to SMTP replies.

    error                                   reply           where
    InvalidSignature                        535 5.7.8       AUTH (bad, unknown or revoked key)
    AccountNotActivated, SubscriptionExpired 550 5.7.1      MAIL
    RateLimited, DailyLimitReached          452 4.5.3       MAIL, DATA (temporary: retry later)
    MessageTooLarge                         552 5.3.4       MAIL (SIZE=), DATA
    InvalidDomain, UnknownSender            553 5.7.1       MAIL, DATA
    BadRequest (and NotFound)               550 5.6.0       DATA (the message cannot be sent as is)
    ServiceUnavailable, any other error     451 4.3.0       anywhere (nothing was accepted)

The reply text is the error's message, the same words the HTTP API answers with.
"""

from __future__ import annotations

from sendkit.errors import (
    AccountNotActivated,
    BadRequest,
    DailyLimitReached,
    InvalidDomain,
    InvalidSignature,
    MessageTooLarge,
    RateLimited,
    SendKitError,
    SubscriptionExpired,
    UnknownSender,
)

# Checked in order: the first class the error is an instance of decides.
REPLIES: tuple[tuple[type[SendKitError], int, str], ...] = (
    (InvalidSignature, 535, "5.7.8"),
    (AccountNotActivated, 550, "5.7.1"),
    (SubscriptionExpired, 550, "5.7.1"),
    (RateLimited, 452, "4.5.3"),
    (DailyLimitReached, 452, "4.5.3"),
    (MessageTooLarge, 552, "5.3.4"),
    (InvalidDomain, 553, "5.7.1"),
    (UnknownSender, 553, "5.7.1"),
    (BadRequest, 550, "5.6.0"),
)
LOCAL_ERROR = "451 4.3.0 Local error, please try again later"


def _one_line(text: str) -> str:
    # A reply is one line of ASCII; an error message must not be able to add a second.
    cleaned = "".join(c if " " <= c <= "~" else " " for c in text)
    return " ".join(cleaned.split())[:400] or "Error"


def reply_for(exc: SendKitError) -> str:
    for cls, code, enhanced in REPLIES:
        if isinstance(exc, cls):
            return f"{code} {enhanced} {_one_line(exc.message)}"
    if exc.status == 503:
        return f"451 4.3.0 {_one_line(exc.message)}"
    return LOCAL_ERROR
