"""The reading process of a large CSV import:
`python -P -m sendkit.import_child PARENT_PID NICENESS PATH BATCH GROUP APP_ID STATUS`.

Reads and validates the file as `imports._Reader` does in a thread, and writes to stdout
one frame (`sendkit.framing`) per `GROUP` batches of `BATCH` rows: `(batches, failure)`,
what `_Reader.batches` returns. It ends after a frame with a failure or with no batches
(the end of the file), or when its parent dies. The pipe is its flow control: it reads
ahead until the parent stops taking frames.
"""

from __future__ import annotations

import contextlib
import fcntl
import pickle
import sys
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from sendkit.framing import become_helper, frame

if TYPE_CHECKING:
    from sendkit.imports import _Batches

# A frame of 5,000 rows is ~0.35 MB: with a pipe this big the next one is written while the
# parent still writes the last, and the reading goes on meanwhile.
_PIPE_BYTES = 1 << 20


def _send(sink: BinaryIO, found: _Batches) -> None:
    try:
        data = frame(found)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        # An error that cannot cross the pipe still ends the job, with its text.
        data = frame((found[0], RuntimeError(f"{type(found[1]).__name__}: {found[1]} ({exc})")))
    sink.write(data)
    sink.flush()


def serve(sink: BinaryIO, path: Path, size: int, group: int, app_id: str, status: str) -> None:
    from sendkit.contacts import Status
    from sendkit.imports import _Reader

    try:
        reader = _Reader.open(path, app_id, Status(status))
    except Exception as exc:  # no header, not UTF-8, unreadable: the parent reports it
        _send(sink, ([], exc))
        return
    reader.size = size
    with reader.stream:
        while True:
            batches, failure = reader.batches(group)
            _send(sink, (batches, failure))
            if failure is not None or not batches:
                return


def main(argv: list[str]) -> None:
    parent, niceness, path, size, group = int(argv[0]), int(argv[1]), argv[2], *map(int, argv[3:5])
    # Before the app's modules (a second of imports): a Ctrl-C meanwhile is the parent's.
    sink = become_helper(parent, niceness)
    with contextlib.suppress(OSError, AttributeError):  # Linux: room for a frame or two
        fcntl.fcntl(sink, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    serve(sink, Path(path), size, group, argv[5], argv[6])


if __name__ == "__main__":
    main(sys.argv[1:])
