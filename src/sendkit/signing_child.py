"""A signing process: `python -P -m sendkit.signing_child PARENT_PID NICENESS`.

Reads batches of signing requests from stdin and writes one batch of results for each to
stdout, in order; ends at the end of stdin, or when its parent dies. It imports
`sendkit.dkim` and little else (tens of MB, where a multiprocessing child re-imports the
parent's whole `__main__`: the app, ~90 MB).

A frame is a 4-byte big-endian length and a pickle: requests are `[(message, DkimKey,
now), ...]`, results `[bytes | ValueError, ...]`. Only the parent writes to this process.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import pickle
import signal
import struct
import sys
from typing import BinaryIO

from sendkit import dkim

_LENGTH = struct.Struct(">I")
_PR_SET_PDEATHSIG = 1


def end_with_parent(parent: int) -> None:
    """SIGTERM when the parent dies without its cleanup (Linux; elsewhere a no-op),
    also if it died while this process was starting."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        raise SystemExit(0)


def frame(value: object) -> bytes:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


def frame_length(header: bytes) -> int:
    (length,) = _LENGTH.unpack(header)
    return int(length)


HEADER_SIZE = _LENGTH.size


def sign_batch(requests: list[tuple[bytes, dkim.DkimKey, int]]) -> list[bytes | ValueError]:
    """One result per request, in order: a message that cannot be signed fails alone
    (as ValueError, what callers of `dkim.sign` handle), never the batch."""
    results: list[bytes | ValueError] = []
    for message, key, now in requests:
        try:
            results.append(dkim.sign(message, key, now))
        except ValueError as exc:
            results.append(exc)
        except Exception as exc:
            results.append(ValueError(f"cannot sign: {type(exc).__name__}: {exc}"))
    return results


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    return data if len(data) == size else None


def serve(source: BinaryIO, sink: BinaryIO) -> None:
    while (header := _read_exactly(source, HEADER_SIZE)) is not None:
        body = _read_exactly(source, frame_length(header))
        if body is None:
            return
        # Only the parent that started this process writes its input.
        sink.write(frame(sign_batch(pickle.loads(body))))  # noqa: S301
        sink.flush()


def main(argv: list[str]) -> None:
    parent, niceness = int(argv[0]), int(argv[1])
    # The parent decides when signing stops (it drains its deliveries first): a Ctrl-C
    # reaching the whole process group must not take the signer away under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    end_with_parent(parent)
    if niceness:
        with contextlib.suppress(OSError):
            os.nice(niceness)
    # Frames go to a copy of stdout; whatever else writes to fd 1 (a stray print, a
    # library's warning) lands on stderr instead of in the middle of a frame.
    frames = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(sys.stdin.buffer, frames)


if __name__ == "__main__":
    main(sys.argv[1:])
