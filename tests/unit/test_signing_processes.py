"""DKIM signing in processes beside the delivery process, in batches."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
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


async def _signs_all(signer: signing.ProcessSigner, key: DkimKey, count: int) -> None:
    """`count` concurrent signatures, each exactly `sign`'s, within 10 s."""
    messages = [_message(n) for n in range(count)]
    signed = await asyncio.wait_for(
        asyncio.gather(*(signer.sign(m, key, NOW) for m in messages)), 10
    )
    assert signed == [sign(m, key, NOW) for m in messages]


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
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert argv[1:4] == [b"-P", b"-m", b"sendkit.signing_child"]
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
    signed = await asyncio.wait_for(asyncio.gather(*pending), 10)
    assert signed == [sign(_message(n), key, NOW) for n in range(10)]
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


async def test_a_process_that_cannot_start_leaves_signing_to_threads(key: DkimKey) -> None:
    """No process to be had (here /bin/false, which ends at once): every message is
    still signed, and new processes are tried after a growing pause, not in a loop."""
    broken = signing.ProcessSigner(1, command=("/bin/false",))
    broken.start()
    try:
        for _ in range(3):
            await _signs_all(broken, key, 5)
            await asyncio.sleep(0.3)
        assert broken.started <= 3
    finally:
        await broken.close()


# Answers every batch with an empty list: out of step with what it was sent.
_OUT_OF_STEP = """
import sys
from sendkit import signing_child as c
while header := sys.stdin.buffer.read(c.HEADER_SIZE):
    sys.stdin.buffer.read(c.frame_length(header))
    sys.stdout.buffer.write(c.frame([]))
    sys.stdout.buffer.flush()
"""


async def test_a_process_out_of_step_is_replaced_and_its_batch_signed_here(
    key: DkimKey,
) -> None:
    odd = signing.ProcessSigner(1, command=(sys.executable, "-c", _OUT_OF_STEP))
    odd.start()
    try:
        await _signs_all(odd, key, 5)
    finally:
        await odd.close()


# Answers its first batch, then exits: on uvloop the pipe to it closes at once, and a
# batch written after that must still be signed.
_ONE_BATCH = """
import sys
from sendkit import signing_child as c
header = sys.stdin.buffer.read(c.HEADER_SIZE)
body = sys.stdin.buffer.read(c.frame_length(header))
import pickle
sys.stdout.buffer.write(c.frame(c.sign_batch(pickle.loads(body))))
sys.stdout.buffer.flush()
"""


def test_a_process_that_exits_under_load_loses_nothing_on_uvloop(key: DkimKey) -> None:
    import uvloop

    async def main() -> None:
        short = signing.ProcessSigner(1, command=(sys.executable, "-c", _ONE_BATCH))
        short.start()
        try:
            await _signs_all(short, key, 200)
            later = await asyncio.wait_for(short.sign(_message(1), key, NOW), 10)
            assert later == sign(_message(1), key, NOW)
        finally:
            await short.close()

    uvloop.run(main())


async def test_a_process_that_starts_after_failing_is_used(key: DkimKey, tmp_path: Path) -> None:
    """Two failed starts (pauses of 0.5 s and 1 s, threads signing meanwhile), then a
    process that works: it is used."""
    counter = tmp_path / "starts"
    script = (
        f"n=$(cat {counter} 2>/dev/null || echo 0); echo $((n+1)) > {counter}; "
        f'[ "$n" -ge 2 ] && exec {sys.executable} -P -m sendkit.signing_child "$@"; exit 1'
    )
    flaky = signing.ProcessSigner(1, command=("sh", "-c", script, "sh"))
    flaky.start()
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while not any(child.answered for child in flaky._children):
            assert asyncio.get_running_loop().time() < deadline, "never started again"
            header = await asyncio.wait_for(flaky.sign(_message(0), key, NOW), 5)
            assert header == sign(_message(0), key, NOW)
            await asyncio.sleep(0.1)
        assert flaky.started == 3
        assert await flaky.sign(_message(1), key, NOW) == sign(_message(1), key, NOW)
    finally:
        await flaky.close()


async def test_a_silent_process_is_replaced(key: DkimKey) -> None:
    quiet = signing.ProcessSigner(1, answer_within=0.5)
    quiet.start()
    try:
        await quiet.sign(_message(0), key, NOW)
        (pid,) = quiet.pids
        os.kill(pid, signal.SIGSTOP)
        await _signs_all(quiet, key, 5)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        await asyncio.wait_for(quiet.sign(_message(9), key, NOW), 10)
        assert quiet.pids and quiet.pids != [pid]
    finally:
        await quiet.close()


async def test_no_process_to_be_had_still_signs(
    key: DkimKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def cannot(*args: object, **kwargs: object) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(signing.asyncio, "create_subprocess_exec", cannot)
    none = signing.ProcessSigner(1)
    none.start()
    try:
        await _signs_all(none, key, 3)
    finally:
        await none.close()


async def test_answered_batches_are_let_go(signer: signing.ProcessSigner, key: DkimKey) -> None:
    """Nothing holds a message once it is signed (a batch's deadline held it for 30 s,
    ~190 MB at full speed)."""
    await asyncio.gather(*(signer.sign(_message(n), key, NOW) for n in range(50)))
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, signing._Pending)]


async def test_batches_are_bounded_in_bytes(signer: signing.ProcessSigner, key: DkimKey) -> None:
    """Large messages go a few at a time (at most 8 MB a batch, at least one message)."""
    await signer.sign(_message(0), key, NOW)  # started
    (child,) = signer._children
    sizes: list[int] = []
    real = child.send

    def measured(batch: list[signing._Pending]) -> None:
        sizes.append(sum(len(item.request[0]) for item in batch))
        real(batch)

    child.send = measured  # type: ignore[method-assign]
    big = [_message(n) + b"x" * (5 * 1024 * 1024) + b"\r\n" for n in range(4)]
    signed = await asyncio.wait_for(asyncio.gather(*(signer.sign(m, key, NOW) for m in big)), 30)
    assert signed == [sign(m, key, NOW) for m in big]
    assert len(sizes) == 4 and max(sizes) < 8 * 1024 * 1024
