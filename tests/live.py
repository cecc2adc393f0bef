"""A real `sendkit serve` process for tests that must go through uvicorn and curl."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import free_port


@dataclass
class LiveServer:
    base_url: str
    data_dir: Path
    env: dict[str, str]
    log_path: Path
    pid: int

    def cli(self, *args: str) -> dict[str, Any]:
        """Run a CLI command against the same database and parse its --json output."""
        out = subprocess.run(
            [sys.executable, "-m", "sendkit", *args, "--data-dir", str(self.data_dir), "--json"],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def logs(self) -> str:
        return self.log_path.read_text()


def server_env(database_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SENDKIT_DATABASE_URL=database_url,
        SENDKIT_SECRET_KEY="live-test-secret",
        SENDKIT_ENVIRONMENT="test",
        **extra,
    )
    return env


@contextmanager
def live_server(tmp_path: Path, database_url: str, **extra_env: str) -> Iterator[LiveServer]:
    port = free_port()
    data_dir = tmp_path / "live"
    env = server_env(database_url, **extra_env)
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sendkit",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_for_port(port, proc)
            yield LiveServer(f"http://127.0.0.1:{port}", data_dir, env, log_path, proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sendkit serve exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("sendkit serve did not start within 30 s")
