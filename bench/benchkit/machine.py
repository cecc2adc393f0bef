"""Facts about the machine and the software a run measured."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import sqlite3
from pathlib import Path
from typing import Any

from benchkit.sendkit_side import postgres_version
from benchkit.tools import tool_version


def _cpu_model() -> str | None:
    text = Path("/proc/cpuinfo").read_text(errors="replace")
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return match[1].strip() if match else None


def _memory_mib() -> int | None:
    match = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return int(match[1]) // 1024 if match else None


def _sendkit_version() -> str | None:
    try:
        from sendkit import __version__
    except ImportError:
        return None
    return str(__version__)


def facts() -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "memory_mib": _memory_mib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "postgresql_server": postgres_version(),
        "postfix": tool_version(["postconf", "-d", "mail_version"], r"mail_version = (\S+)")
        or tool_version(["/usr/sbin/postconf", "-d", "mail_version"], r"mail_version = (\S+)"),
        "wrk": tool_version(["wrk", "-v"], r"wrk (\S+)"),
        "sendkit": _sendkit_version(),
    }
