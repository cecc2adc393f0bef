"""The access line's fast path writes exactly what structlog's configured chain writes."""

from __future__ import annotations

import json
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
