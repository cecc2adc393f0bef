"""`sendkit serve` with several processes (SENDKIT_WEB_PROCESSES): one socket, shared
rate limits through Redis, and a server that outlives one of its processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from sendkit.config import Settings
from tests.conftest import REDIS_URL, need_server
from tests.live import LiveServer, live_server

pytestmark = [pytest.mark.slow, pytest.mark.redis]

SEND = {"from": "from@example.com", "to": "to@example.com", "subject": "s", "body": "b"}


def test_several_processes_need_redis(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="SENDKIT_REDIS_URL"):
        Settings(data_dir=tmp_path, web_processes=2)
    assert Settings(data_dir=tmp_path, web_processes=2, redis_url=REDIS_URL).web_processes == 2


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.add(int(entry))
    return found


def _cmdline(pid: int) -> str:
    """A process's command line; empty once it is gone (one just killed and reaped
    between listing the children and reading this)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:
        return ""


def serving_processes(server: LiveServer, count: int) -> set[int]:
    """The server's worker processes (uvicorn's parent also runs a resource tracker)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = {pid for pid in children(server.pid) if "spawn_main" in _cmdline(pid)}
        if len(found) >= count:
            return found
        time.sleep(0.2)
    raise AssertionError(f"expected {count} serving processes under {server.pid}")


async def burst(server: LiveServer, token: str, count: int) -> list[int]:
    # A connection each, so the requests spread over the processes' accept loops.
    async def one() -> int:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            response = await client.post(
                "/v1/send", json=SEND, headers={"Authorization": f"Bearer {token}"}
            )
            return response.status_code

    return sorted(await asyncio.gather(*(one() for _ in range(count))))


def test_two_processes_share_one_socket_and_one_rate_limit(
    tmp_path: Path, database_url: str
) -> None:
    need_server("Redis", "127.0.0.1", 6379)
    env = {"SENDKIT_WEB_PROCESSES": "2", "SENDKIT_REDIS_URL": REDIS_URL}
    with live_server(tmp_path, database_url, **env) as server:
        demo = server.cli("init", "--demo")
        token = demo["apiKey"]
        first, second = sorted(serving_processes(server, 2))
        # Rate limits are per account across every process: 5 a second, not 5 each.
        assert asyncio.run(burst(server, token, 10)) == [200] * 5 + [429] * 5
        # Each process's log lines say which process wrote them.
        pids = {
            json.loads(line).get("pid") for line in server.logs().splitlines() if "{" in line[:1]
        }
        assert pids & {first, second}
        time.sleep(1.1)
        # One process dies: the other keeps answering while uvicorn replaces it.
        os.kill(first, signal.SIGKILL)
        assert asyncio.run(burst(server, token, 3)) == [200] * 3
        assert second in serving_processes(server, 1)
