"""Retry schedules as data, and classification of SMTP replies.

A :class:`RetryPolicy` says how long to wait after each failed attempt and
when to stop.  :func:`next_attempt_at` is pure (the clock and the random
source are arguments), so schedules are testable to the second.

Spec format accepted by :meth:`RetryPolicy.parse` (for configuration)::

    <delay>[,<delay>...][;<key>=<value>...]

    delays        durations: a number with an optional unit s, m, h or d
                  (default seconds), e.g. "30", "1.5", "5m", "2h", "1d"
    give_up=D     required; duration after the first attempt with no more tries
    jitter=F      optional fraction in [0, 1), default 0.15
    max_attempts=N  optional positive integer, or "none"

    e.g. "1,2,5;give_up=30"  or  "5m,25m,30m,1h,2h,3h;give_up=5d;jitter=0.1"

Whitespace around items is ignored.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

__all__ = [
    "DEFAULT_SMTP_POLICY",
    "WEBHOOK_POLICY",
    "ReplyOutcome",
    "RetryPolicy",
    "classify_reply",
    "is_permanent",
    "next_attempt_at",
]

ReplyOutcome = Literal["delivered", "deferred", "bounced"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_INTEGER = re.compile(r"\d+")
_SPEC_HELP = 'expected e.g. "1,2,5;give_up=30" or "5m,1h;give_up=5d;jitter=0.1;max_attempts=4"'


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """When to retry after a failed attempt, and when to give up.

    ``delays[i]`` is the wait after attempt ``i + 1`` fails; past the end the
    last delay repeats.  Each wait is scaled by a random factor in
    ``[1 - jitter, 1 + jitter]`` so that a burst of failures does not retry
    in lockstep.  Retrying stops when ``give_up_after`` seconds have passed
    since the first attempt, or once ``max_attempts`` attempts were made.
    """

    delays: tuple[float, ...]
    give_up_after: float
    jitter: float = 0.15
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if not self.delays:
            raise ValueError("RetryPolicy needs at least one delay")
        if any(not math.isfinite(d) or d < 0 for d in self.delays):
            raise ValueError(f"delays must be finite and >= 0, got {self.delays!r}")
        if not math.isfinite(self.give_up_after) or self.give_up_after <= 0:
            raise ValueError(f"give_up_after must be > 0 seconds, got {self.give_up_after!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter!r}")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 or None, got {self.max_attempts!r}")

    @classmethod
    def parse(cls, spec: str) -> RetryPolicy:
        """Parse a configuration string (format in the module docstring)."""
        delays_part, *option_parts = spec.split(";")
        delays = tuple(_parse_duration(spec, item) for item in delays_part.split(","))
        options = _parse_options(spec, option_parts)
        if "give_up" not in options:
            raise ValueError(f"invalid retry spec {spec!r}: missing give_up; {_SPEC_HELP}")
        try:
            return cls(
                delays=delays,
                give_up_after=_parse_duration(spec, options["give_up"]),
                jitter=_parse_jitter(spec, options.get("jitter", "0.15")),
                max_attempts=_parse_max_attempts(spec, options.get("max_attempts", "none")),
            )
        except ValueError as exc:
            raise ValueError(f"invalid retry spec {spec!r}: {exc}") from exc

    def delay_after(self, attempts_done: int) -> float:
        """The nominal (un-jittered) wait after ``attempts_done`` attempts."""
        return self.delays[min(max(attempts_done, 1), len(self.delays)) - 1]


def _parse_options(spec: str, parts: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for part in parts:
        key, sep, value = (p.strip() for p in part.partition("="))
        if not sep or not key or not value:
            raise ValueError(f"invalid retry spec {spec!r}: {part.strip()!r} is not key=value")
        if key not in ("give_up", "jitter", "max_attempts"):
            raise ValueError(
                f"invalid retry spec {spec!r}: unknown option {key!r} "
                "(known: give_up, jitter, max_attempts)"
            )
        if key in options:
            raise ValueError(f"invalid retry spec {spec!r}: option {key!r} given twice")
        options[key] = value
    return options


def _parse_duration(spec: str, text: str) -> float:
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid retry spec {spec!r}: {text.strip()!r} is not a duration "
            "(a number with optional unit s, m, h or d)"
        )
    return float(match[1]) * _UNITS[match[2] or "s"]


def _parse_jitter(spec: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"invalid retry spec {spec!r}: jitter {text!r} is not a number") from None


def _parse_max_attempts(spec: str, text: str) -> int | None:
    if text.lower() == "none":
        return None
    if not _INTEGER.fullmatch(text):
        raise ValueError(f"invalid retry spec {spec!r}: max_attempts {text!r} is not an integer")
    return int(text)


#: RFC 5321 §4.5.4.1: retry for at least 4-5 days, first retry after >= 30 min
#: is suggested; 5 min first catches greylisting, which most receivers use.
DEFAULT_SMTP_POLICY = RetryPolicy(
    delays=(300, 1500, 1800, 3600, 7200, 10800), give_up_after=5 * 86400
)

#: 8 attempts in about 27.6 h (5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h);
#: ``give_up_after`` only backstops ``max_attempts``, even with full jitter.
WEBHOOK_POLICY = RetryPolicy(
    delays=(5, 300, 1800, 7200, 18000, 36000, 36000),
    give_up_after=2 * 86400,
    max_attempts=8,
)


def next_attempt_at(
    policy: RetryPolicy,
    attempts_done: int,
    first_attempt_at: datetime,
    now: datetime,
    rng: random.Random,
) -> datetime | None:
    """When to try again after ``attempts_done`` attempts failed; None = give up.

    The wait is measured from ``now`` (the failure), not from the previous
    schedule, so slow attempts do not compress the spacing.  A retry that
    would land after the give-up deadline is moved onto the deadline, so the
    message gets one last try instead of being abandoned hours early.
    ``attempts_done == 0`` (never tried) means "now".  Both datetimes must be
    timezone-aware.
    """
    if attempts_done < 0:
        raise ValueError(f"attempts_done must be >= 0, got {attempts_done}")
    if first_attempt_at.utcoffset() is None or now.utcoffset() is None:
        raise ValueError("first_attempt_at and now must be timezone-aware")
    if policy.max_attempts is not None and attempts_done >= policy.max_attempts:
        return None
    deadline = first_attempt_at + timedelta(seconds=policy.give_up_after)
    if now >= deadline:
        return None
    if attempts_done == 0:
        return now
    delay = policy.delay_after(attempts_done)
    if policy.jitter:
        delay *= 1 + rng.uniform(-policy.jitter, policy.jitter)
    return min(now + timedelta(seconds=delay), deadline)


def classify_reply(code: int | None, *, connection_error: bool = False) -> ReplyOutcome:
    """Map the final SMTP reply of an attempt to what happens to the message.

    2xx delivered; 5xx bounced; 4xx and no reply (``None``: timeout, dropped
    connection) deferred.  ``connection_error=True`` means the transaction
    did not complete, so it is deferred whatever ``code`` holds (that is then
    only the last reply seen, e.g. a 220 greeting, which must not count as
    delivered); pass the final reply without the flag once one was received.
    Anything else (1xx/3xx as a final reply, out-of-range numbers) is a
    protocol oddity: deferred, as a retry is cheap and a wrong bounce is not.
    """
    if connection_error or code is None:
        return "deferred"
    if 200 <= code <= 299:
        return "delivered"
    if is_permanent(code):
        return "bounced"
    return "deferred"


def is_permanent(code: int | None) -> bool:
    """Whether ``code`` is a permanent negative completion reply (5xx)."""
    return code is not None and 500 <= code <= 599
