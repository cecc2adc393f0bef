"""The end-to-end peer: smtp-source -> a private loopback Postfix -> smtp-sink."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from benchkit import procs
from benchkit.sendkit_side import RECIPIENT, SENDER

# Queue directories a message passes through; all empty = everything was delivered.
_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
# Postfix's defaults, except smtpd's back-off when the queue manager lags (the setting
# sendkit.testing.postfix suggests for benchmarks): the peer at full speed.
POSTFIX_SETTINGS = {"in_flow_delay": "0"}


@dataclass
class PostfixRun:
    messages: int
    delivered: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.delivered / self.seconds


def _queued_files(queue_dir: Path) -> int:
    return sum(len(files) for name in _QUEUES for _, _, files in os.walk(queue_dir / name))


def _sent_in_log(maillog: Path) -> int:
    try:
        return maillog.read_text(errors="replace").count(" status=sent ")
    except FileNotFoundError:
        return 0


def run_postfix(work_dir: Path, sink_port: int, messages: int, size: int) -> PostfixRun:
    """Push `messages` messages of `size` bytes over 20 sessions (`smtp-source -d`) and
    time it until Postfix's queue is empty."""
    from sendkit.testing.postfix import PostfixInstance, smtp_source_command

    with PostfixInstance(work_dir, next_hop_port=sink_port, settings=POSTFIX_SETTINGS) as mta:
        argv = smtp_source_command(
            mta.port,
            messages=messages,
            sessions=20,
            size=size,
            sender=SENDER,
            recipient=RECIPIENT,
            extra_args=["-d"],
        )
        started = time.perf_counter()
        source = procs.spawn("smtp-source", argv, log_path=work_dir / "smtp-source.log")
        try:
            seconds = _wait_until_delivered(source, mta.queue_dir, started, 120 + messages / 50)
        finally:
            source.stop()
        return PostfixRun(messages, _wait_for_log(mta.maillog_path, messages), seconds)


def _wait_until_delivered(
    source: procs.Proc, queue_dir: Path, started: float, timeout: float
) -> float:
    while time.perf_counter() - started < timeout:
        if not source.running():
            if source.popen.returncode != 0:
                raise RuntimeError(f"smtp-source failed:\n{source.log_tail()}")
            if _queued_files(queue_dir) == 0:
                return time.perf_counter() - started
        time.sleep(0.02)
    raise TimeoutError(f"Postfix did not empty its queue within {timeout:.0f} s")


def _wait_for_log(maillog: Path, expected: int, timeout: float = 10.0) -> int:
    """postlogd writes the log a little behind the queue: the delivered count."""
    deadline = time.monotonic() + timeout
    sent = _sent_in_log(maillog)
    while sent < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        sent = _sent_in_log(maillog)
    return sent
