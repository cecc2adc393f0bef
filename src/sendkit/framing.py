"""What SendKit's helper processes (`signing_child`, `import_child`) share with the
process that started them: pickled frames on a pipe, and a lifetime bound to the parent's.

A frame is a 4-byte big-endian length and a pickle. Helpers are plain subprocesses
(`python -P -m ...`), not multiprocessing children: those re-import the parent's
`__main__`, the whole app, ~90 MB of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import pickle
import signal
import struct
from typing import Any, BinaryIO

_LENGTH = struct.Struct(">I")
_PR_SET_PDEATHSIG = 1

HEADER_SIZE = _LENGTH.size


def frame(value: object) -> bytes:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


def frame_length(header: bytes) -> int:
    (length,) = _LENGTH.unpack(header)
    return int(length)


async def read_frame(stream: asyncio.StreamReader) -> Any:
    """The next frame's value, from a helper this process started (only it writes that
    pipe, so its pickles are trusted); IncompleteReadError once the helper has gone."""
    header = await stream.readexactly(HEADER_SIZE)
    return pickle.loads(await stream.readexactly(frame_length(header)))  # noqa: S301


def read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    return data if len(data) == size else None


def end_with_parent(parent: int) -> None:
    """SIGTERM when the parent dies without its cleanup (Linux; elsewhere a no-op),
    also if it died while this process was starting."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        raise SystemExit(0)


def become_helper(parent: int, niceness: int) -> BinaryIO:
    """Set up a helper process; the stream its frames go to.

    The parent decides when a helper stops: a Ctrl-C reaching the whole process group must
    not take it away under the parent. Frames go to a copy of stdout; whatever else writes
    to fd 1 (a stray print, a library's warning) lands on stderr instead of in a frame."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    end_with_parent(parent)
    if niceness:
        with contextlib.suppress(OSError):
            os.nice(niceness)
    frames = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    return frames
