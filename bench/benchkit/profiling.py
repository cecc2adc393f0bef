"""py-spy on `sendkit serve` during a phase (`run.py --profile DIR`), and a summary of the
collapsed stacks it writes: the frames and packages with the largest inclusive share."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchkit import procs

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def py_spy() -> str | None:
    found = Path(sys.executable).with_name("py-spy")
    return str(found) if found.exists() else shutil.which("py-spy")


@contextmanager
def profiled(profile_dir: Path | None, pid: int, name: str) -> Iterator[None]:
    """Sample `pid` (all threads, 100 Hz, without pausing it) while the block runs."""
    binary = py_spy() if profile_dir is not None else None
    if profile_dir is None or binary is None:
        if profile_dir is not None:
            print("py-spy not found (.venv/bin/pip install py-spy): not profiling", flush=True)
        yield
        return
    profile_dir.mkdir(parents=True, exist_ok=True)
    raw = profile_dir / f"{name}.txt"
    argv = [binary, "record", "-p", str(pid), "--subprocesses", "-r", "100", "--nonblocking"]
    argv += ["-f", "raw"]
    recorder = procs.spawn(
        f"py-spy {name}", [*argv, "-o", str(raw)], log_path=profile_dir / f"{name}.log"
    )
    try:
        yield
    finally:
        recorder.popen.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        try:
            recorder.popen.wait(30)
        except subprocess.TimeoutExpired:
            recorder.stop()
    if raw.exists():
        (profile_dir / f"{name}-summary.txt").write_text(summarize(raw))


def _parse(raw: Path) -> Iterator[tuple[list[str], int]]:
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            yield stack.split(";"), int(count)


def _package(frame: str) -> str:
    match = _FRAME.match(frame)
    path = match["file"] if match else frame
    for marker in ("site-packages/", "lib/python3.11/", "src/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    parts = path.replace(".py", "").split("/")
    return "/".join(parts[:2]) if parts[0] == "sendkit" else parts[0]


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    file = match["file"]
    for marker in ("site-packages/", "src/"):
        file = file.split(marker, 1)[-1]
    return f"{match['func']} ({file})"


def summarize(raw: Path, top: int = 30) -> str:
    total = 0
    frames: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for stack, count in _parse(raw):
        total += count
        for frame in {_short(f) for f in stack}:
            frames[frame] += count
        for package in {_package(f) for f in stack}:
            packages[package] += count
        leaves[_package(stack[-1])] += count
    if not total:
        return "no samples\n"
    lines = [f"{total} samples (all threads, idle excluded)", "", "inclusive % by frame:"]
    lines += [f"{100 * n / total:6.1f}%  {f}" for f, n in frames.most_common(top)]
    lines += ["", "inclusive % by package:"]
    lines += [f"{100 * n / total:6.1f}%  {p}" for p, n in packages.most_common(top)]
    lines += ["", "self % by package (where the leaf frame is):"]
    lines += [f"{100 * n / total:6.1f}%  {p}" for p, n in leaves.most_common(top)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 30))
