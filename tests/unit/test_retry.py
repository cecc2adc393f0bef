from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from sendkit.delivery.retry import (
    DEFAULT_SMTP_POLICY,
    WEBHOOK_POLICY,
    RetryPolicy,
    classify_reply,
    is_permanent,
    next_attempt_at,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def no_jitter(policy: RetryPolicy) -> RetryPolicy:
    return RetryPolicy(
        delays=policy.delays,
        give_up_after=policy.give_up_after,
        jitter=0,
        max_attempts=policy.max_attempts,
    )


# --------------------------------------------------------------------------
# Schedules


def test_default_smtp_policy_values() -> None:
    assert DEFAULT_SMTP_POLICY.delays == (300, 1500, 1800, 3600, 7200, 10800)
    assert DEFAULT_SMTP_POLICY.give_up_after == 5 * 86400
    assert DEFAULT_SMTP_POLICY.jitter == 0.15
    assert DEFAULT_SMTP_POLICY.max_attempts is None


def test_webhook_policy_values() -> None:
    assert WEBHOOK_POLICY.delays == (5, 300, 1800, 7200, 18000, 36000, 36000)
    assert WEBHOOK_POLICY.max_attempts == len(WEBHOOK_POLICY.delays) + 1
    worst_case = sum(WEBHOOK_POLICY.delays) * (1 + WEBHOOK_POLICY.jitter)
    assert worst_case < WEBHOOK_POLICY.give_up_after


def test_schedule_without_jitter_follows_delays_then_repeats_last() -> None:
    policy = RetryPolicy(delays=(10, 20, 30), give_up_after=1000, jitter=0)
    rng = random.Random(0)
    now = T0
    got = []
    for attempts in range(1, 6):
        nxt = next_attempt_at(policy, attempts, T0, now, rng)
        assert nxt is not None
        got.append((nxt - now).total_seconds())
        now = nxt
    assert got == [10, 20, 30, 30, 30]


def test_smtp_schedule_nominal() -> None:
    policy = no_jitter(DEFAULT_SMTP_POLICY)
    now = T0
    waits = []
    for attempts in range(1, 9):
        nxt = next_attempt_at(policy, attempts, T0, now, random.Random(1))
        assert nxt is not None
        waits.append((nxt - now).total_seconds())
        now = nxt
    assert waits == [300, 1500, 1800, 3600, 7200, 10800, 10800, 10800]


def test_wait_is_measured_from_now_not_first_attempt() -> None:
    policy = RetryPolicy(delays=(60,), give_up_after=10_000, jitter=0)
    assert next_attempt_at(policy, 3, T0, at(500), random.Random(0)) == at(560)


def test_zero_attempts_means_now() -> None:
    assert next_attempt_at(DEFAULT_SMTP_POLICY, 0, T0, at(5), random.Random(0)) == at(5)


def wait_seconds(policy: RetryPolicy, attempts: int, rng: random.Random) -> float:
    nxt = next_attempt_at(policy, attempts, T0, T0, rng)
    assert nxt is not None
    return (nxt - T0).total_seconds()


def test_jitter_stays_within_bounds_and_varies() -> None:
    policy = RetryPolicy(delays=(1000,), give_up_after=10**9, jitter=0.15)
    rng = random.Random(1234)
    waits = {wait_seconds(policy, 1, rng) for _ in range(2000)}
    assert min(waits) >= 850
    assert max(waits) <= 1150
    assert len(waits) > 1000
    assert min(waits) < 870
    assert max(waits) > 1130


def test_jitter_is_reproducible_with_seeded_rng() -> None:
    first = next_attempt_at(DEFAULT_SMTP_POLICY, 2, T0, T0, random.Random(42))
    second = next_attempt_at(DEFAULT_SMTP_POLICY, 2, T0, T0, random.Random(42))
    assert first == second
    assert first is not None
    assert 1275 <= (first - T0).total_seconds() <= 1725


def test_gives_up_after_deadline() -> None:
    policy = RetryPolicy(delays=(10,), give_up_after=100, jitter=0)
    assert next_attempt_at(policy, 5, T0, at(100), random.Random(0)) is None
    assert next_attempt_at(policy, 5, T0, at(250), random.Random(0)) is None


def test_last_retry_is_clamped_to_deadline() -> None:
    policy = RetryPolicy(delays=(60,), give_up_after=100, jitter=0)
    assert next_attempt_at(policy, 1, T0, at(90), random.Random(0)) == at(100)
    assert next_attempt_at(policy, 2, T0, at(100), random.Random(0)) is None


def test_smtp_policy_gives_up_after_five_days() -> None:
    rng = random.Random(7)
    now, attempts = T0, 1
    while (nxt := next_attempt_at(DEFAULT_SMTP_POLICY, attempts, T0, now, rng)) is not None:
        assert nxt <= T0 + timedelta(days=5)
        now, attempts = nxt, attempts + 1
    assert now == T0 + timedelta(days=5)
    assert 40 < attempts < 50


def test_max_attempts() -> None:
    policy = RetryPolicy(delays=(1, 2), give_up_after=10**6, jitter=0, max_attempts=3)
    rng = random.Random(0)
    assert next_attempt_at(policy, 1, T0, T0, rng) == at(1)
    assert next_attempt_at(policy, 2, T0, T0, rng) == at(2)
    assert next_attempt_at(policy, 3, T0, T0, rng) is None


def test_webhook_policy_makes_eight_attempts() -> None:
    rng = random.Random(3)
    now, attempts = T0, 1
    while (nxt := next_attempt_at(WEBHOOK_POLICY, attempts, T0, now, rng)) is not None:
        now, attempts = nxt, attempts + 1
    assert attempts == 8
    assert timedelta(hours=23) < now - T0 < timedelta(hours=32)


def test_next_attempt_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="attempts_done"):
        next_attempt_at(DEFAULT_SMTP_POLICY, -1, T0, T0, random.Random(0))
    with pytest.raises(ValueError, match="timezone-aware"):
        next_attempt_at(DEFAULT_SMTP_POLICY, 1, T0.replace(tzinfo=None), T0, random.Random(0))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delays": (), "give_up_after": 10},
        {"delays": (-1,), "give_up_after": 10},
        {"delays": (float("nan"),), "give_up_after": 10},
        {"delays": (1,), "give_up_after": 0},
        {"delays": (1,), "give_up_after": float("inf")},
        {"delays": (1,), "give_up_after": 10, "jitter": 1.0},
        {"delays": (1,), "give_up_after": 10, "jitter": -0.1},
        {"delays": (1,), "give_up_after": 10, "max_attempts": 0},
    ],
)
def test_policy_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# parse


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("1,2,5;give_up=30", RetryPolicy(delays=(1, 2, 5), give_up_after=30)),
        (
            " 5m , 1h,1.5 ; give_up = 5d ; jitter=0.1 ",
            RetryPolicy(delays=(300, 3600, 1.5), give_up_after=432000, jitter=0.1),
        ),
        (
            "5s,5m;give_up=2d;max_attempts=3;jitter=0",
            RetryPolicy(delays=(5, 300), give_up_after=172800, jitter=0, max_attempts=3),
        ),
        ("10;max_attempts=none;give_up=1h", RetryPolicy(delays=(10,), give_up_after=3600)),
        ("0;give_up=1", RetryPolicy(delays=(0,), give_up_after=1)),
    ],
)
def test_parse_good(spec: str, expected: RetryPolicy) -> None:
    assert RetryPolicy.parse(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "not a duration"),
        ("1,2,5", "missing give_up"),
        ("1,,5;give_up=30", "not a duration"),
        ("1,x;give_up=30", "'x' is not a duration"),
        ("-1;give_up=30", "not a duration"),
        ("nan;give_up=30", "not a duration"),
        ("1;give_up=0", "give_up_after must be > 0"),
        ("1;give_up=30;foo=1", "unknown option 'foo'"),
        ("1;give_up=30;give_up=40", "given twice"),
        ("1;give_up", "not key=value"),
        ("1;give_up=30;", "not key=value"),
        ("1;give_up=30;jitter=lots", "jitter 'lots' is not a number"),
        ("1;give_up=30;jitter=1.5", "jitter must be in"),
        ("1;give_up=30;max_attempts=2.5", "max_attempts '2.5' is not an integer"),
        ("1;give_up=30;max_attempts=0", "max_attempts must be >= 1"),
        ("5w;give_up=30", "not a duration"),
    ],
)
def test_parse_bad(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"^invalid retry spec") as excinfo:
        RetryPolicy.parse(spec)
    assert message in str(excinfo.value)
    assert repr(spec) in str(excinfo.value)


def test_parsed_policy_schedules_in_seconds() -> None:
    policy = RetryPolicy.parse("1,2,5;give_up=30;jitter=0")
    rng = random.Random(0)
    assert next_attempt_at(policy, 1, T0, at(0), rng) == at(1)
    assert next_attempt_at(policy, 3, T0, at(10), rng) == at(15)
    assert next_attempt_at(policy, 9, T0, at(28), rng) == at(30)
    assert next_attempt_at(policy, 10, T0, at(30), rng) is None


# --------------------------------------------------------------------------
# Reply classification


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (250, "delivered"),
        (251, "delivered"),
        (200, "delivered"),
        (421, "deferred"),
        (450, "deferred"),
        (451, "deferred"),
        (452, "deferred"),
        (500, "bounced"),
        (550, "bounced"),
        (552, "bounced"),
        (554, "bounced"),
        (None, "deferred"),
        (354, "deferred"),
        (199, "deferred"),
        (600, "deferred"),
    ],
)
def test_classify_reply(code: int | None, expected: str) -> None:
    assert classify_reply(code) == expected


def test_connection_error_is_deferred_whatever_the_code() -> None:
    assert classify_reply(None, connection_error=True) == "deferred"
    assert classify_reply(250, connection_error=True) == "deferred"
    assert classify_reply(550, connection_error=True) == "deferred"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (550, True),
        (500, True),
        (599, True),
        (450, False),
        (250, False),
        (None, False),
        (600, False),
    ],
)
def test_is_permanent(code: int | None, expected: bool) -> None:
    assert is_permanent(code) is expected
