"""Domain errors. Each carries the documented code and its HTTP status.

    SendKitError                      (100500, 500)
    ├── InvalidSignature              (100029, 401)  missing/unknown key or bad signature
    ├── AccountNotActivated           (100049, 403)
    ├── SubscriptionExpired           (100047, 403)
    ├── RateLimited                   (100025, 429)
    ├── BadRequest                    (100033, 400)
    │   ├── NotFound                  (100033, 404)
    │   ├── InvalidCredentials        (100033, 401)  dashboard login: wrong email or password
    │   └── InvalidToken              (100033, 400)  activation or reset link bad or expired
    ├── MessageTooLarge               (100023, 413)
    ├── InvalidDomain                 (100030, 403)
    ├── UnknownSender                 (100048, 403)
    ├── DailyLimitReached             (100031, 429)
    ├── RouteNotFound                 (100404, 404)
    ├── MethodNotAllowed              (100405, 405)
    └── ServiceUnavailable            (100503, 503)

The docstring of each class is its default message. The HTTP layer turns them into the
envelope in one handler (`web/app.py`); the SMTP layer maps them in one table.
"""

from __future__ import annotations


class SendKitError(Exception):
    """Internal server error"""

    code: int = 100500
    status: int = 500

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None):
        self.message = message or (self.__doc__ or "").strip().splitlines()[0]
        self.headers = headers or {}
        super().__init__(self.message)


class InvalidSignature(SendKitError):
    """Invalid signature"""

    code, status = 100029, 401


class AccountNotActivated(SendKitError):
    """Please activate your account"""

    code, status = 100049, 403


class SubscriptionExpired(SendKitError):
    """Your subscription has expired. Please renew to continue using the service"""

    code, status = 100047, 403


class RateLimited(SendKitError):
    """Exceeding the maximum sending limit"""

    code, status = 100025, 429


class BadRequest(SendKitError):
    """Bad request parameters"""

    code, status = 100033, 400


class NotFound(BadRequest):
    """Not found"""

    status = 404


class InvalidCredentials(BadRequest):
    """Wrong email or password"""

    status = 401


class InvalidToken(BadRequest):
    """This link is invalid or has expired"""


class MessageTooLarge(SendKitError):
    """Email too large"""

    code, status = 100023, 413


class InvalidDomain(SendKitError):
    """The sending domain is invalid"""

    code, status = 100030, 403


class UnknownSender(SendKitError):
    """The sender's email address does not exist"""

    code, status = 100048, 403


class DailyLimitReached(SendKitError):
    """You have reached the maximum daily sending limit"""

    code, status = 100031, 429


class RouteNotFound(SendKitError):
    """No such endpoint"""

    code, status = 100404, 404


class MethodNotAllowed(SendKitError):
    """Method not allowed on this endpoint"""

    code, status = 100405, 405


class ServiceUnavailable(SendKitError):
    """Service temporarily unavailable, please retry"""

    code, status = 100503, 503
