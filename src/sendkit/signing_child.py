"""A signing process: `python -P -m sendkit.signing_child PARENT_PID NICENESS`.

Reads batches of signing requests from stdin and writes one batch of results for each to
stdout, in order; ends at the end of stdin, or when its parent dies. It imports
`sendkit.dkim` and little else (tens of MB).

Frames (`sendkit.framing`): requests are `[(message, DkimKey, now), ...]`, results
`[bytes | ValueError, ...]`. Only the parent writes to this process.
"""

from __future__ import annotations

import pickle
import sys
from typing import BinaryIO

from sendkit import dkim
from sendkit.framing import HEADER_SIZE, become_helper, frame, frame_length, read_exactly


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


def serve(source: BinaryIO, sink: BinaryIO) -> None:
    while (header := read_exactly(source, HEADER_SIZE)) is not None:
        body = read_exactly(source, frame_length(header))
        if body is None:
            return
        # Only the parent that started this process writes its input.
        sink.write(frame(sign_batch(pickle.loads(body))))  # noqa: S301
        sink.flush()


def main(argv: list[str]) -> None:
    parent, niceness = int(argv[0]), int(argv[1])
    serve(sys.stdin.buffer, become_helper(parent, niceness))


if __name__ == "__main__":
    main(sys.argv[1:])
