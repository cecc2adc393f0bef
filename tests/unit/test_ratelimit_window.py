"""The in-process moving window: exact at the edges, and bounded in memory."""

from __future__ import annotations

import pytest

from sendkit import ratelimit
from sendkit.ratelimit import RateLimiter


def test_the_window_moves_with_time() -> None:
    limiter = RateLimiter()
    hits = [limiter._hit_here("a", 2, t) for t in (10.0, 10.5, 10.9, 11.0, 11.2)]
    assert [allowed for allowed, _, _ in hits] == [True, True, False, True, False]
    # At 11.0 the request of 10.0 has left the window; the oldest left is 10.5.
    assert hits[3] == (True, 2, 10.5)


def test_idle_accounts_are_forgotten_past_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit, "_MAX_WINDOWS", 3)
    limiter = RateLimiter()
    for n in range(5):
        limiter._hit_here(f"old{n}", 5, 100.0)
    limiter._hit_here("new", 5, 200.0)
    assert set(limiter._windows) == {"new"}
