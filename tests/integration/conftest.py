"""Fixtures for integration tests that need an SMTP server: a real in-process aiosmtpd sink."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Protocol

import pytest

from sendkit.testing.smtp import SmtpSink


class SinkFactory(Protocol):
    async def __call__(self, **options: Any) -> SmtpSink: ...


@pytest.fixture
async def smtp_sink() -> AsyncIterator[SmtpSink]:
    """A started plaintext sink; set ``smtp_sink.fault`` to make it misbehave."""
    async with SmtpSink() as sink:
        yield sink


@pytest.fixture
async def smtp_sink_factory() -> AsyncIterator[SinkFactory]:
    """Start more sinks (``await smtp_sink_factory(tls="starttls")``); all stop at teardown."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(**options: Any) -> SmtpSink:
            return await stack.enter_async_context(SmtpSink(**options))

        yield make
