"""Structured logs: one JSON object a line, with the request's id bound in context."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import threading
import time
from collections.abc import MutableMapping
from contextvars import ContextVar, Token
from typing import Any

import orjson
import structlog


def configure(*, json: bool = True, level: str = "INFO", with_pid: bool = False) -> None:
    """`with_pid`: one of several server processes; each line says which."""
    processors: list[structlog.typing.Processor] = [
        _add_request_id,
        *([_add_pid] if with_pid else []),
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if json
        else structlog.dev.ConsoleRenderer()
    )
    chain = [*processors, renderer]
    level_number = logging.getLevelName(level.upper())
    structlog.configure(
        processors=chain,
        wrapper_class=structlog.make_filtering_bound_logger(level_number),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    global _json_lines
    _json_lines = _JsonLines(chain, level_number <= logging.INFO, with_pid) if json else None


class _JsonLines:
    """What `configure(json=True)` makes of an info line, without structlog's work per
    call (a logger bound through the lazy proxy, six processors, print and flush): a
    quarter of a send's CPU in-process went to its one access line. Only while the
    configuration `configure` installed is in place (tests and CLI commands swap it)."""

    def __init__(self, chain: list[Any], enabled: bool, with_pid: bool) -> None:
        self.chain = chain
        self.enabled = enabled
        self.with_pid = with_pid

    def current(self) -> bool:
        return structlog.get_config()["processors"] is self.chain

    def info(self, event: str, fields: dict[str, Any]) -> None:
        """The same keys, in the same order, as the processors above."""
        if not self.enabled:
            return
        fields["event"] = event
        request_id = _request_id.get()
        if request_id is not None:
            fields.setdefault("request_id", request_id)
        if self.with_pid:
            fields["pid"] = os.getpid()
        fields["level"] = "info"
        fields["timestamp"] = utc_stamp(time.time_ns())
        _lines.add(_dumps(fields) + "\n")


# The last second `utc_stamp` formatted, and its text up to the seconds.
_second: tuple[int, str] = (-1, "")


def utc_stamp(ns: int) -> str:
    """`TimeStamper(fmt="iso", utc=True)`'s text for a time in nanoseconds (microseconds
    left out when there are none, as `isoformat` does), with the date and time of day
    formatted once a second: `datetime.isoformat` was 1 % of a send's CPU."""
    global _second
    seconds, rest = divmod(ns, 1_000_000_000)
    known, prefix = _second
    if known != seconds:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second = (seconds, prefix)
    micro = rest // 1000
    return f"{prefix}.{micro:06d}Z" if micro else f"{prefix}Z"


class _Lines(threading.local):
    """Info lines written on an event loop go out together at the end of its turn, in
    one write: a write per line was a system call per request (stderr is line-buffered),
    ~5 % of a send's CPU in the API process. Any other line of the thread flushes them
    first, so the order holds; outside a loop a line is written at once. Per thread: each
    loop flushes its own."""

    def __init__(self) -> None:
        self.pending: list[str] = []
        # The loop a flush is scheduled on: one that stopped before running it must not
        # keep the lines of the thread's next loop waiting.
        self.flushes_on: asyncio.AbstractEventLoop | None = None
        _every_thread[threading.get_ident()] = self.pending

    def add(self, line: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            sys.stderr.write(line)
            return
        if self.flushes_on is not loop:
            self.flushes_on = loop
            loop.call_soon(self.flush)
        self.pending.append(line)

    def flush(self) -> None:
        self.flushes_on = None
        _write_out(self.pending)


def _write_out(pending: list[str]) -> None:
    if pending:
        text = "".join(pending)
        pending.clear()
        sys.stderr.write(text)


def _flush_every_thread() -> None:
    for pending in list(_every_thread.values()):
        _write_out(pending)


# Each thread's pending lines, for the flush at exit (a later thread with the same id
# takes the entry over: the earlier one is gone).
_every_thread: dict[int, list[str]] = {}
_lines = _Lines()
atexit.register(_flush_every_thread)


_json_lines: _JsonLines | None = None


def info(logger: structlog.typing.FilteringBoundLogger, event: str, **fields: Any) -> None:
    """`logger.info(event, **fields)`, for lines written on every request."""
    lines = _json_lines
    if lines is not None and lines.current():
        lines.info(event, fields)
    else:
        logger.info(event, **fields)


# The request being served, on every log line it causes. One ContextVar of our own: the
# structlog helpers copy the whole context on every bind and every line.
_request_id: ContextVar[str | None] = ContextVar("sendkit_request_id", default=None)


def bind_request(request_id: str) -> Token[str | None]:
    return _request_id.set(request_id)


def unbind_request(token: Token[str | None]) -> None:
    _request_id.reset(token)


def _add_request_id(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    request_id = _request_id.get()
    if request_id is not None:
        event.setdefault("request_id", request_id)
    return event


def _add_pid(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event["pid"] = os.getpid()
    return event


def _dumps(value: Any, **_: Any) -> str:
    # orjson: a log line per request and per delivery, at a fraction of json.dumps' cost.
    return orjson.dumps(value, default=str).decode()


class _CurrentStderr:
    """Whatever sys.stderr is when a line is written, not when logging was configured:
    test runners and daemons swap it, and a closed stream must never take logging down."""

    def write(self, text: str) -> int:
        _lines.flush()
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
