"""The access line's fast path writes exactly what structlog's configured chain writes."""

from __future__ import annotations

import asyncio
import datetime
import json
import sys
import time
from typing import Any

import pytest
import structlog

from sendkit import logs

FIELDS = {"method": "POST", "path": "/v1/send", "status": 200, "duration_ms": 1.25}


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("with_pid", [False, True])
def test_the_fast_line_equals_structlogs_line(
    capsys: pytest.CaptureFixture[str], with_pid: bool
) -> None:
    logs.configure(json=True, level="INFO", with_pid=with_pid)
    log = logs.get("sendkit.http")
    token = logs.bind_request("req-1")
    try:
        capsys.readouterr()
        log.info("request", **FIELDS)
        logs.info(log, "request", **FIELDS)
    finally:
        logs.unbind_request(token)
    slow, fast = _lines(capsys)
    assert list(fast) == list(slow)  # same keys, same order
    slow.pop("timestamp"), fast.pop("timestamp")
    assert fast == slow
    assert fast["request_id"] == "req-1" and fast["level"] == "info"


@pytest.mark.parametrize(
    "ns",
    [
        0,
        1_795_772_400_000_000_000,  # a whole second: no fraction, as isoformat has it
        1_795_772_400_000_001_999,  # one microsecond (nanoseconds dropped)
        1_795_772_459_999_999_999,  # the last microsecond of a minute
        1_795_772_460_123_456_000,  # the next second, after the cached one
    ],
)
def test_the_fast_timestamp_is_isoformats_in_utc(ns: int) -> None:
    seconds, rest = divmod(ns, 1_000_000_000)
    when = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).replace(
        microsecond=rest // 1000
    )
    assert logs.utc_stamp(ns) == when.isoformat().replace("+00:00", "Z")


def test_the_fast_timestamp_is_structlogs() -> None:
    stamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    before = stamper(None, "info", {})["timestamp"]
    ours = logs.utc_stamp(time.time_ns())
    after = stamper(None, "info", {})["timestamp"]
    # To the second (a whole second has no fraction, in isoformat as here).
    assert before[:19] <= ours[:19] <= after[:19] and ours.endswith("Z")
    assert ours[19] in ".Z" and ours[10] == "T"


def test_the_fast_line_keeps_the_configured_level(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure(json=True, level="WARNING")
    capsys.readouterr()
    logs.info(logs.get("sendkit.http"), "request", **FIELDS)
    assert _lines(capsys) == []


def test_another_configuration_takes_over_from_the_fast_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure(json=True)
    seen: list[dict[str, Any]] = []

    def keep(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        seen.append(dict(event))
        raise structlog.DropEvent

    structlog.configure(processors=[keep])  # as a test or a CLI command may
    capsys.readouterr()
    logs.info(logs.get("sendkit.http"), "request", **FIELDS)
    assert seen == [{**FIELDS, "event": "request"}]
    assert _lines(capsys) == []


class _CountingStderr:
    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_lines_of_one_loop_turn_are_written_together_and_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A group commit answers many requests in one turn of the loop: their access lines
    go out in one write at its end; a line of another kind flushes them first."""
    logs.configure(json=True)
    err = _CountingStderr()
    monkeypatch.setattr(sys, "stderr", err)
    log = logs.get("sendkit.http")

    async def turn() -> int:
        for i in range(5):
            logs.info(log, "request", n=i)
        written = len(err.writes)
        log.warning("slow", n=5)  # structlog's own path
        logs.info(log, "request", n=6)
        await asyncio.sleep(0)  # the end of the turn
        return written

    assert asyncio.run(turn()) == 0  # nothing written during the turn
    assert err.writes[0].count("\n") == 5  # the five in one write, then the others
    events = [json.loads(line) for line in "".join(err.writes).splitlines()]
    assert [e["n"] for e in events] == list(range(7))
    logs.info(log, "request", n=7)  # no loop: at once
    assert json.loads(err.writes[-1])["n"] == 7


def test_a_loop_that_stops_before_its_flush_does_not_hold_up_the_next_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logs.configure(json=True)
    err = _CountingStderr()
    monkeypatch.setattr(sys, "stderr", err)
    log = logs.get("sendkit.http")
    loop = asyncio.new_event_loop()

    def last_turn() -> None:
        loop.stop()
        logs.info(log, "request", n=1)  # its flush is scheduled, never run

    loop.call_soon(last_turn)
    loop.run_forever()
    loop.close()

    async def later() -> None:
        logs.info(log, "request", n=2)
        await asyncio.sleep(0)

    asyncio.run(later())
    assert [json.loads(line)["n"] for line in "".join(err.writes).splitlines()] == [1, 2]
