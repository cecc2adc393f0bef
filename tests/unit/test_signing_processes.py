"""DKIM signing in processes beside the delivery process, in batches."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import AsyncIterator
from pathlib import Path

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
async def signer() -> AsyncIterator[signing.ProcessSigner]:
    started = signing.ProcessSigner(1)
    started.start()
    yield started
    await started.close()


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_burst_is_signed_exactly_like_sign_in_few_batches(
    signer: signing.ProcessSigner, key: DkimKey
) -> None:
    messages = [_message(n) for n in range(150)]
    await signer.sign(messages[0], key, NOW)  # started
    (child,) = signer._children
    sent = 0
    real = child.send

    def counted(batch: list[signing._Pending]) -> None:
        nonlocal sent
        sent += 1
        real(batch)

    child.send = counted  # type: ignore[method-assign]
    headers = await asyncio.gather(*(signer.sign(m, key, NOW) for m in messages))
    # RSA PKCS#1 v1.5 is deterministic: same input, same signature.
    assert headers == [sign(m, key, NOW) for m in messages]
    assert sent <= 150 // 64 + 3  # batches, not one round trip per message


async def test_signatures_are_computed_in_a_small_process_of_their_own(
    signer: signing.ProcessSigner, key: DkimKey
) -> None:
    await signer.sign(_message(0), key, NOW)
    (pid,) = signer.pids
    assert pid != os.getpid()
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:3] == [
        b"-m",
        b"sendkit.signing_child",
    ]
    # It imports what signing needs, not the app (a multiprocessing child took ~90 MB).
    assert _rss_kb(pid) < 60_000


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
    (pid,) = signer.pids
    pending = [asyncio.ensure_future(signer.sign(_message(n), key, NOW)) for n in range(10)]
    await asyncio.sleep(0)  # sent to the process
    os.kill(pid, signal.SIGKILL)
    # What it had is signed here instead, and a new process takes the next ones.
    assert await asyncio.gather(*pending) == [sign(_message(n), key, NOW) for n in range(10)]
    later = await signer.sign(_message(11), key, NOW)
    assert later == sign(_message(11), key, NOW)
    assert signer.pids and signer.pids != [pid]


async def test_signing_processes_run_below_the_caller_when_asked(key: DkimKey) -> None:
    below = signing.ProcessSigner(1, niceness=dkim.SIGNING_NICENESS)
    below.start()
    try:
        await below.sign(_message(0), key, NOW)
        (pid,) = below.pids
        here = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, here + dkim.SIGNING_NICENESS)
    finally:
        await below.close()


async def test_close_stops_the_processes_and_refuses_more(key: DkimKey) -> None:
    closing = signing.ProcessSigner(2)
    closing.start()
    await asyncio.gather(*(closing.sign(_message(n), key, NOW) for n in range(4)))
    pids = closing.pids
    assert len(pids) == 2
    await closing.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
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
        header = await signing.start(0).sign(_message(3), key, NOW)
    finally:
        dkim.sign = real  # type: ignore[assignment]
    assert header == sign(_message(3), key, NOW)
    assert seen and seen[0] != threading.get_ident()
