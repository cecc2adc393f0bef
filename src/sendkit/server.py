"""`sendkit serve`: migrate, then run uvicorn with the app (and workers), in one process or
in `web_processes` processes sharing the listening socket."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.process
import os
import signal
import threading
import time
from typing import Any

import typer
import uvicorn
from fastapi import FastAPI

from sendkit import accounts, dkim, logs
from sendkit import services as services_mod
from sendkit.config import Settings
from sendkit.delivery.runner import run_process
from sendkit.framing import end_with_parent
from sendkit.migrate import migrate
from sendkit.web.app import create_app
from sendkit.web.protocol import SendKitProtocol

log = logs.get("sendkit.serve")


async def _prepare(settings: Settings, init_demo: bool) -> dict[str, str] | None:
    """Migrate; on the very first start with `init_demo`, create the demo account."""
    services = services_mod.build(settings)
    try:
        await migrate(services.db)
        if not init_demo or await accounts.find_demo(services.db) is not None:
            return None
        from sendkit.cli import ensure_demo

        return {k: str(v) for k, v in (await ensure_demo(services)).items()}
    finally:
        await services.close()


def _banner(settings: Settings, demo: dict[str, str]) -> str:
    base = f"http://{settings.host}:{settings.port}"
    return f"""
SendKit is starting with a demo account (shown once; keep it):
  API key          {demo["apiKey"]}
  signing secret   {demo["signingSecret"]}
  appId            {demo["appId"]}
  dashboard login  {demo.get("dashboardEmail", "")} / {demo.get("dashboardPassword", "")}
  data directory   {settings.data_dir.resolve()}

Try it:
  curl -X POST {base}/v1/send \\
    -H "Content-Type: application/json; charset=utf-8" \\
    -H "Authorization: Bearer {demo["apiKey"]}" \\
    -d '{{"from": "from@example.com", "to": "to@example.com",
         "subject": "test send", "body": "test content"}}'

Delivery mode: {settings.delivery} (nothing leaves this machine in sandbox mode).
Look a message up:  .venv/bin/sendkit messages show <X-Message-Id> --data-dir {settings.data_dir}
Dashboard:          {base}/ (the dashboard login above)
API docs:           {base}/docs
"""


# Several processes: the parent hands its exact settings to each child (spawned, so it
# imports this module afresh) through the environment.
_SETTINGS_ENV = "SENDKIT_SERVE_SETTINGS_JSON"


def app_from_environment() -> FastAPI:
    """The app of one of several `sendkit serve` processes (a uvicorn factory)."""
    settings = Settings.model_validate_json(os.environ[_SETTINGS_ENV])
    logs.configure(json=settings.json_logs, level=settings.log_level, with_pid=True)
    return create_app(settings)


def serve(settings: Settings, *, init_demo: bool = False) -> None:
    logs.configure(json=settings.json_logs, level=settings.log_level)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    demo = asyncio.run(_prepare(settings, init_demo))
    if demo is not None:
        typer.echo(_banner(settings, demo))
    if settings.worker_processes == 0:
        _serve_web(settings)
        return
    with DeliveryProcesses(settings):
        # uvicorn re-raises the SIGTERM it stopped for: as an exception here, so the
        # delivery processes are stopped (gracefully) on the way out.
        signal.signal(signal.SIGTERM, _exit_quietly)
        _serve_web(settings.model_copy(update={"workers": False}))


def _exit_quietly(signum: int, _frame: object) -> None:
    raise SystemExit(0)


def _serve_web(settings: Settings) -> None:
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "access_log": False,
        "log_config": None,
        "server_header": False,
        "http": SendKitProtocol,
    }
    if settings.web_processes == 1:
        uvicorn.Server(uvicorn.Config(create_app(settings), **options)).run()
        return
    # Unset fields stay unset in the children: defaults like `base_url` depend on it.
    os.environ[_SETTINGS_ENV] = settings.model_dump_json(exclude_unset=True)
    uvicorn.run(
        f"{__name__}:app_from_environment",
        factory=True,
        workers=settings.web_processes,
        **options,
    )


def _deliver(settings_json: str, parent: int) -> None:
    """One delivery process: `sendkit worker` with the parent's settings, niced."""
    # The parent ignores SIGTERM while it stops its children; a child started meanwhile
    # must still hear it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    end_with_parent(parent)
    # Its own process group: a terminal's Ctrl-C reaches `serve` alone, which stops the
    # API first and then asks this process (SIGTERM) to finish what it has in flight.
    os.setpgid(0, 0)
    settings = Settings.model_validate_json(settings_json)
    with contextlib.suppress(OSError):
        os.nice(settings.worker_niceness)
    logs.configure(json=settings.json_logs, level=settings.log_level, with_pid=True)
    # Niced as a whole already, with no API to make way for.
    dkim.keep_signing_at_process_priority()
    run_process(settings)


class DeliveryProcesses:
    """`worker_processes` delivery processes for as long as the API runs; one that dies
    is started again (after a pause, so a crash loop does not spin). One that exits
    cleanly, or by SIGTERM, was asked to stop: it is not."""

    RESTART_PAUSE = 1.0

    def __init__(self, settings: Settings) -> None:
        self._settings_json = settings.model_dump_json(exclude_unset=True)
        self._count = settings.worker_processes
        self._stop_timeout = settings.shutdown_timeout + 5
        self._context = multiprocessing.get_context("spawn")
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._processes: list[multiprocessing.process.BaseProcess] = []

    def __enter__(self) -> DeliveryProcesses:
        try:
            for slot in range(self._count):
                self._processes.append(self._start())
                threading.Thread(target=self._watch, args=(slot,), daemon=True).start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> multiprocessing.process.BaseProcess:
        process = self._context.Process(
            target=_deliver, args=(self._settings_json, os.getpid()), name="sendkit-delivery"
        )
        process.start()
        log.info("delivery_process_started", pid=process.pid)
        return process

    def _watch(self, slot: int) -> None:
        while not self._stopping.is_set():
            process = self._processes[slot]
            process.join()
            # Finished, or ended by a SIGTERM that came before its handler was in place:
            # either way it was asked to stop. Anything else (a crash, SIGKILL) restarts.
            if process.exitcode in (0, -signal.SIGTERM):
                log.info("delivery_process_stopped", pid=process.pid, code=process.exitcode)
                return
            if self._stopping.wait(self.RESTART_PAUSE):
                return
            log.error("delivery_process_exited", pid=process.pid, code=process.exitcode)
            with self._lock:  # never start one after __exit__ has looked
                if self._stopping.is_set():
                    return
                self._processes[slot] = self._start()

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._stopping.set()
        # A second SIGTERM must not cut the graceful stop short halfway.
        previous = _ignore_sigterm()
        try:
            for process in self._processes:
                if process.is_alive():
                    process.terminate()  # SIGTERM: in-flight transactions finish first
            deadline = time.monotonic() + self._stop_timeout
            for process in self._processes:
                process.join(max(0.0, deadline - time.monotonic()))
                if process.is_alive():
                    process.kill()
                    process.join()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _ignore_sigterm() -> Any:
    """The previous SIGTERM handler, now ignored; None off the main thread (unchanged)."""
    try:
        return signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:
        return None
