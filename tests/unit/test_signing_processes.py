"""DKIM signing in processes beside the delivery process, in batches."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest

from sendkit import dkim, signing
from sendkit.dkim import DkimKey, generate_private_key, sign

NOW = 1_700_000_000


def _message(n: int) -> bytes:
    return (
        f"From: a@example.com\r\nTo: b{n}@example.net\r\nSubject: hi {n}\r\n\r\nbody {n}\r\n"
    ).encode()


@pytest.fixture(scope="module")
def key() -> DkimKey:
    return DkimKey(domain="example.com", selector="s1", private_key_pem=generate_private_key())


@pytest.fixture
async def signer() -> signing.ProcessSigner:
    started = signing.ProcessSigner(1)
    started.start()
    yield started
    started.close()


def _children(signer: signing.ProcessSigner) -> list[int]:
    pool = signer._pool
    assert pool is not None
    return list(pool._processes)  # type: ignore[attr-defined]


async def test_a_burst_is_signed_exactly_like_sign_in_few_batches(
    signer: signing.ProcessSigner, key: DkimKey
) -> None:
    messages = [_message(n) for n in range(150)]
    calls = 0
    real = signer._in_pool

    async def counted(
        pool: object, requests: list[tuple[bytes, DkimKey, int]]
    ) -> list[bytes | ValueError]:
        nonlocal calls
        calls += 1
        return await real(pool, requests)  # type: ignore[arg-type]

    signer._in_pool = counted  # type: ignore[method-assign]
    headers = await asyncio.gather(*(signer.sign(m, key, NOW) for m in messages))
    # RSA PKCS#1 v1.5 is deterministic: same input, same signature.
    assert headers == [sign(m, key, NOW) for m in messages]
    assert calls <= 150 // 64 + 3  # batches, not one round trip per message


async def test_signatures_are_computed_in_another_process(
    signer: signing.ProcessSigner, key: DkimKey
) -> None:
    await signer.sign(_message(0), key, NOW)
    children = _children(signer)
    assert children and os.getpid() not in children


async def test_a_bad_message_fails_alone(signer: signing.ProcessSigner, key: DkimKey) -> None:
    no_from = b"To: b@example.net\r\nSubject: hi\r\n\r\nbody\r\n"
    results = await asyncio.gather(
        signer.sign(_message(1), key, NOW),
        signer.sign(no_from, key, NOW),
        signer.sign(_message(2), key, NOW),
        return_exceptions=True,
    )
    assert results[0] == sign(_message(1), key, NOW)
    assert isinstance(results[1], ValueError)
    assert results[2] == sign(_message(2), key, NOW)


async def test_a_killed_signing_process_loses_no_signature(
    signer: signing.ProcessSigner, key: DkimKey
) -> None:
    await signer.sign(_message(0), key, NOW)
    (child,) = _children(signer)
    os.kill(child, signal.SIGKILL)
    # Those in the broken pool are signed here instead, and a fresh pool takes the next.
    first = await asyncio.gather(*(signer.sign(_message(n), key, NOW) for n in range(10)))
    assert first == [sign(_message(n), key, NOW) for n in range(10)]
    later = await signer.sign(_message(11), key, NOW)
    assert later == sign(_message(11), key, NOW)
    assert _children(signer) != [child]


async def test_signing_processes_run_below_the_caller_when_asked(key: DkimKey) -> None:
    below = signing.ProcessSigner(1, niceness=dkim.SIGNING_NICENESS)
    below.start()
    try:
        await below.sign(_message(0), key, NOW)
        (child,) = _children(below)
        here = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, child) == min(19, here + dkim.SIGNING_NICENESS)
    finally:
        below.close()


async def test_close_stops_the_processes_and_refuses_more(key: DkimKey) -> None:
    closing = signing.ProcessSigner(1)
    closing.start()
    await closing.sign(_message(0), key, NOW)
    (child,) = _children(closing)
    closing.close()
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    with pytest.raises(RuntimeError):
        await closing.sign(_message(1), key, NOW)


async def test_zero_processes_sign_in_this_process_threads(key: DkimKey) -> None:
    seen: list[int] = []
    real = dkim.sign

    def recording(message: bytes, key: DkimKey, now: int) -> bytes:
        seen.append(threading.get_ident())
        return real(message, key, now)

    dkim.sign = recording  # type: ignore[assignment]
    try:
        header = await signing.shared(0).sign(_message(3), key, NOW)
    finally:
        dkim.sign = real  # type: ignore[assignment]
    assert header == sign(_message(3), key, NOW)
    assert seen and seen[0] != threading.get_ident()
