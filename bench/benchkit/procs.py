"""Child processes in their own process group, stopped as a group; ports on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    """A process started by `spawn`: the leader of its own session and process group."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the group, SIGKILL after `timeout`; leftovers of the group go too."""
        if self.running():
            self.signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.popen.wait()
        self.signal_group(signal.SIGKILL)  # e.g. workers a supervisor left behind


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    cwd: Path | None = None,
) -> Proc:
    output = log_path.open("ab") if log_path is not None else None
    try:
        popen = subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=output if output is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if output is not None:
            output.close()
    return Proc(name, popen, log_path)


def wait_port(port: int, proc: Proc, timeout: float = 60.0) -> None:
    """Until something accepts on 127.0.0.1:`port`; fails early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.running():
            raise RuntimeError(
                f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}"
            )
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not listen on {LOOPBACK}:{port} in {timeout:.0f} s")


def run(
    argv: Sequence[str], *, timeout: float = 120.0, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run to completion; stdout and stderr captured as text; raises on a non-zero exit."""
    result = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env) if env is not None else None,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def read_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, ... in kB from /proc/<pid>/status ({} once the process is gone)."""
    values: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if name.startswith("Vm") and parts and parts[0].isdigit():
                values[name] = int(parts[0])
    return values


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (the delivery and signing processes of a server)."""
    pids = [pid]
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                pids += _tree(int(child))
    return pids


def tree_peak_kb(pid: int) -> int:
    """VmHWM of `pid` plus its descendants' (the signing processes): an upper bound of
    what the whole installation held at once."""
    return sum(read_status(each).get("VmHWM", 0) for each in _tree(pid))


def _cpu_ticks(pids: list[int]) -> dict[int, int]:
    ticks = {}
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            ticks[pid] = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks


def wait_settled(pid: int, timeout: float = 30.0) -> None:
    """Until `pid` and its descendants have used under a tenth of a core for half a
    second, the same processes throughout: a server answers before its delivery and
    signing processes have finished starting (importing the app costs a second of CPU),
    which must not be counted in the measurement that follows."""
    deadline = time.monotonic() + timeout
    before = _cpu_ticks(_tree(pid))
    while time.monotonic() < deadline:
        time.sleep(0.5)
        after = _cpu_ticks(_tree(pid))
        used = sum(after[each] - before.get(each, 0) for each in after)
        # A process that came or went meanwhile: the tree is still changing.
        if after.keys() == before.keys() and used < 0.05 * os.sysconf("SC_CLK_TCK"):
            return
        before = after
    raise TimeoutError(f"pid {pid} still busy after {timeout:.0f} s")
