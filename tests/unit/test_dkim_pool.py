"""Signing off the event loop, in threads below its priority."""

from __future__ import annotations

import asyncio
import os
import threading

from sendkit import dkim
from sendkit.dkim import DkimKey, generate_private_key, sign, sign_in_pool

MESSAGE = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nbody\r\n"


async def test_the_pool_signs_exactly_like_sign() -> None:
    key = DkimKey(domain="example.com", selector="s1", private_key_pem=generate_private_key())
    # RSA PKCS#1 v1.5 is deterministic: same input, same signature.
    assert await sign_in_pool(MESSAGE, key, 1_700_000_000) == sign(MESSAGE, key, 1_700_000_000)


async def test_signing_threads_run_below_the_event_loop() -> None:
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    here = niceness()
    there = await asyncio.get_running_loop().run_in_executor(dkim.signing_pool(), niceness)
    assert there == min(19, here + dkim.SIGNING_NICENESS)
