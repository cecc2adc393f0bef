"""`sendkit serve` with SENDKIT_WORKER_PROCESSES: delivery runs in processes of its own at
a lower CPU priority, one that dies is replaced, and none outlives the server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from sendkit.filelock import ApiBusy
from tests.integration.test_processes import SEND, children, serving_processes
from tests.live import LiveServer, live_server

pytestmark = [pytest.mark.slow]


def niceness(pid: int) -> int:
    return niceness_of(Path(f"/proc/{pid}/stat"))


def niceness_of(stat: Path) -> int:
    return int(stat.read_text().rpartition(")")[2].split()[16])


def send_and_wait(server: LiveServer, token: str, within: float = 30) -> int:
    """Send one message; the pid of the process whose log says it was delivered."""
    response = httpx.post(
        f"{server.base_url}/v1/send", json=SEND, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200, response.text
    message_id = response.headers["X-Message-Id"]
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for line in server.logs().splitlines():
            if not line.startswith("{"):
                continue
            entry = json.loads(line)
            if entry.get("message_id") == message_id and entry.get("status") == "delivered":
                return int(entry["pid"])
        time.sleep(0.2)
    raise AssertionError(f"{message_id} was not delivered:\n{server.logs()[-3000:]}")


def test_delivery_runs_in_its_own_lower_priority_process(tmp_path: Path, database_url: str) -> None:
    # Polling once a minute: a queued message must wake the delivery process (wakeups.py).
    with live_server(
        tmp_path,
        database_url,
        SENDKIT_WORKER_PROCESSES="1",
        SENDKIT_JSON_LOGS="true",
        SENDKIT_POLL_INTERVAL="60",
    ) as server:
        token = server.cli("init", "--demo")["apiKey"]
        (worker,) = serving_processes(server, 1)
        assert niceness(worker) == niceness(server.pid) + 10
        time.sleep(1.5)  # its first (empty) claim is over: it sleeps until woken
        assert send_and_wait(server, token, within=10) == worker
        # Its threads, and its DKIM signing process, keep the process's priority.
        threads = list(Path(f"/proc/{worker}/task").iterdir())
        assert {niceness_of(task / "stat") for task in threads} == {niceness(worker)}
        (signer,) = children(worker)
        assert niceness(signer) == niceness(worker)

        # A delivery process that dies is replaced, and the queue keeps draining.
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (found := serving_processes(server, 1)) == {worker}:
            assert time.monotonic() < deadline, "the delivery process was not replaced"
            time.sleep(0.2)
        (replacement,) = found
        time.sleep(1.5)  # started, claimed nothing, asleep; the API lists it anew
        assert send_and_wait(server, token, within=10) == replacement
        # The killed process's socket refused that send's ping and was cleared away.
        assert len(list((server.data_dir / "run").glob("delivery-*.sock"))) == 1
        replacement_signer = children(replacement)
    # Stopping the server stops its delivery processes, and their signing processes, too.
    assert not Path(f"/proc/{replacement}").exists()
    assert replacement_signer and not any(Path(f"/proc/{p}").exists() for p in replacement_signer)


def test_a_delivery_process_asked_to_stop_is_not_restarted(
    tmp_path: Path, database_url: str
) -> None:
    """SIGTERM from outside (an operator, systemd stopping the whole group) is a request
    to stop: that process finishes and stays stopped; the others go on until the server
    stops them. Each runs in its own process group, so a terminal's Ctrl-C reaches
    `serve` alone."""
    with live_server(
        tmp_path, database_url, SENDKIT_WORKER_PROCESSES="2", SENDKIT_JSON_LOGS="true"
    ) as server:
        token = server.cli("init", "--demo")["apiKey"]
        workers = serving_processes(server, 2)
        for pid in workers:
            assert os.getpgid(pid) == pid
        stopped, other = sorted(workers)
        os.kill(stopped, signal.SIGTERM)
        time.sleep(RESTART_WAIT)
        assert serving_processes(server, 1) == {other}
        assert send_and_wait(server, token) == other
    assert not Path(f"/proc/{other}").exists()


RESTART_WAIT = 3.0  # well past DeliveryProcesses.RESTART_PAUSE


def test_a_saturated_api_process_holds_the_delivery_process_back(
    tmp_path: Path, database_url: str
) -> None:
    """`sendkit serve` wires API first (SQLite): its API process says when a burst
    saturates it, and its delivery process waits (a bounded time) before claiming."""
    if not database_url.startswith("sqlite"):
        pytest.skip("API first is between SQLite processes")
    busy_file = Path(database_url.split("///", 1)[1] + ".api-busy")
    with live_server(
        tmp_path, database_url, SENDKIT_WORKER_PROCESSES="1", SENDKIT_JSON_LOGS="true"
    ) as server:
        demo = server.cli("init", "--demo")
        token = demo["apiKey"]
        server.cli("account", "set-plan", demo["accountId"], "--rate", "1000")
        serving_processes(server, 1)
        time.sleep(1.5)  # the delivery process is up and asleep
        probe = ApiBusy(busy_file)
        try:
            # The delivery side: while an API process says so, a queued message waits.
            other_api = ApiBusy(busy_file)
            other_api.announce()
            headers = {"Authorization": f"Bearer {token}"}
            sent = time.monotonic()
            response = httpx.post(f"{server.base_url}/v1/send", json=SEND, headers=headers)
            message_id = response.headers["X-Message-Id"]
            time.sleep(0.3)
            assert message_id not in server.logs()  # not delivered yet: not even claimed
            other_api.close()
            assert send_and_wait(server, token, within=10) > 0
            assert time.monotonic() - sent >= 0.3

            # The API side: a burst makes the serving process say so, for a while.
            async def burst() -> None:
                async with httpx.AsyncClient(base_url=server.base_url, headers=headers) as c:
                    answers = await asyncio.gather(
                        *(c.post("/v1/send", json=SEND) for _ in range(60))
                    )
                assert {a.status_code for a in answers} == {200}

            asyncio.run(burst())
            assert probe.announced()
            time.sleep(0.5)
            assert not probe.announced()  # quiet again: withdrawn
        finally:
            probe.close()
