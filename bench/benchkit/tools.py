"""Installing wrk and Postfix the way CI does, running wrk and reading its report."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from benchkit import procs

APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

# Only when .ci/install-postfix.sh is missing: the package with no configuration, no service
# started while installing, and a default instance (if any) stopped.
_POSTFIX_FALLBACK = r"""
set -euo pipefail
debconf-set-selections <<'EOF2'
postfix postfix/main_mailer_type select No configuration
postfix postfix/mailname string localhost
EOF2
made=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made=1
fi
apt-cache policy postfix | grep -q 'Candidate: [0-9]' || apt-get update -q
apt-get install -y -q --no-install-recommends postfix
[ "$made" = 1 ] && rm -f /usr/sbin/policy-rc.d
if [ -f /etc/postfix/main.cf ] && /usr/sbin/postfix status >/dev/null 2>&1; then
  /usr/sbin/postfix stop
fi
"""


def _apt_has_candidate(package: str) -> bool:
    policy = subprocess.run(
        ["apt-cache", "policy", package], capture_output=True, text=True, check=False
    )
    return re.search(r"Candidate: [0-9]", policy.stdout) is not None


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    if not _apt_has_candidate("wrk"):
        procs.run(["apt-get", "update", "-q"], timeout=600, env=APT_ENV)
    procs.run(["apt-get", "install", "-y", "-q", "wrk"], timeout=600, env=APT_ENV)


def ensure_postfix(repo: Path) -> None:
    script = repo / ".ci" / "install-postfix.sh"
    if script.exists():
        procs.run(["bash", str(script)], timeout=900, env=APT_ENV)
    elif not (shutil.which("postconf") or Path("/usr/sbin/postconf").exists()):
        procs.run(["bash", "-c", _POSTFIX_FALLBACK], timeout=900, env=APT_ENV)


# --- wrk ------------------------------------------------------------------------------------

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@dataclass
class WrkResult:
    requests: int
    seconds: float
    per_second: float
    non_2xx: int = 0
    socket_errors: int = 0
    timeouts: int = 0  # responses slower than wrk's 2 s timeout (counted, still answered)
    latency_ms: dict[str, float] = field(default_factory=dict)  # "50" -> ms, "99" -> ms
    output: str = ""


def _ms(value: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if match is None:
        raise ValueError(f"unreadable wrk duration {value!r}")
    return float(match[1]) * _UNITS[match[2]]


def parse_wrk(output: str) -> WrkResult:
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if done is None or rate is None:
        raise ValueError(f"unreadable wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    latency = {
        pct: _ms(value)
        for pct, value in re.findall(r"^\s+(\d+)%\s+([\d.]+(?:us|ms|s|m))\s*$", output, re.M)
    }
    return WrkResult(
        requests=int(done[1]),
        seconds=_ms(done[2] + done[3]) / 1000,
        per_second=float(rate[1]),
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()[:3]) if errors else 0,
        timeouts=int(errors[4]) if errors else 0,
        latency_ms=latency,
        output=output,
    )


def wrk_command(
    url: str, script: Path, *, seconds: float, threads: int, connections: int
) -> list[str]:
    return [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]


def run_wrk(
    url: str,
    script: Path,
    *,
    seconds: float,
    env: Mapping[str, str],
    threads: int = 2,
    connections: int = 64,
) -> WrkResult:
    argv = wrk_command(url, script, seconds=seconds, threads=threads, connections=connections)
    environment = {**os.environ, "SENDKIT_BENCH_THREADS": str(threads), **env}
    result = procs.run(argv, timeout=seconds + 60, env=environment)
    return parse_wrk(result.stdout)


class BackgroundWrk:
    """wrk running while the caller watches something else. wrk's main thread sleeps for
    the whole `-d` even when the script has stopped every thread, so `finish()` interrupts
    it (SIGINT: wrk then prints its report as usual)."""

    def __init__(
        self,
        url: str,
        script: Path,
        *,
        seconds: float,
        env: Mapping[str, str],
        output: Path,
        threads: int = 2,
        connections: int = 64,
    ) -> None:
        argv = wrk_command(url, script, seconds=seconds, threads=threads, connections=connections)
        environment = {**os.environ, "SENDKIT_BENCH_THREADS": str(threads), **env}
        self.output = output
        self.proc = procs.spawn("wrk", argv, env=environment, log_path=output)

    def finish(self) -> WrkResult:
        if self.proc.running():
            self.proc.popen.send_signal(signal.SIGINT)
        try:
            self.proc.popen.wait(30)
        finally:
            self.proc.stop()
        return parse_wrk(self.output.read_text(errors="replace"))


def tool_version(argv: list[str], pattern: str) -> str | None:
    """The first match of `pattern` in a tool's output (stdout and stderr), if any."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return None
    match = re.search(pattern, result.stdout + result.stderr)
    return match[1] if match else None


def problems(result: WrkResult) -> str | None:
    """What went wrong in a wrk run, for a figure's note; None when nothing did."""
    found = [
        f"{count} {what}"
        for count, what in (
            (result.non_2xx, "non-2xx answers"),
            (result.socket_errors, "socket errors"),
            (result.timeouts, "responses slower than 2 s"),
        )
        if count
    ]
    return f"wrk: {', '.join(found)}" if found else None


def unwritten_mb() -> float:
    """Data the kernel still has to write back to disk (Dirty + Writeback), in MB."""
    total_kb = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith(("Dirty:", "Writeback:")):
                    total_kb += int(line.split()[1])
    except OSError:
        return 0.0
    return total_kb / 1024


def settle() -> tuple[float, float]:
    """Write back what earlier phases left in the page cache (`sync`), so that a
    measurement's fsyncs do not queue behind a previous phase's writes (a million queued
    messages, a million contacts). (MB that were unwritten, seconds the sync took.)"""
    pending = unwritten_mb()
    started = time.perf_counter()
    os.sync()
    return pending, time.perf_counter() - started
