"""Running workers: inside `sendkit serve`, or alone as `sendkit worker`."""

from __future__ import annotations

import asyncio
import signal

from sendkit import logs, signing, wakeups
from sendkit import services as services_mod
from sendkit.config import Settings
from sendkit.delivery.worker import Worker, make_transport
from sendkit.migrate import migrate
from sendkit.services import Services
from sendkit.wakeups import WakeReceiver
from sendkit.webhooks import WebhookWorker

log = logs.get("sendkit.worker")


class RunningWorkers:
    def __init__(
        self,
        worker: Worker,
        task: asyncio.Task[None],
        stop_event: asyncio.Event,
        webhooks: tuple[WebhookWorker, asyncio.Task[None]] | None = None,
    ):
        self.worker = worker
        self.task = task
        self.stop_event = stop_event
        self.webhooks = webhooks

    async def stop(self) -> None:
        self.stop_event.set()
        tasks = [self.task] + ([self.webhooks[1]] if self.webhooks else [])
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.worker.transport.close()
        # The signing processes stop with the workers that started them.
        await self.worker.signer.close()
        if self.webhooks is not None:
            await self.webhooks[0].close()


def start_workers(services: Services, *, concurrency: int | None = None) -> RunningWorkers:
    settings = services.settings
    worker = Worker(
        services,
        make_transport(settings, services.db),
        concurrency=concurrency,
        signer=signing.start(settings.signing_processes),
    )
    services.extras["worker"] = worker
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop), name="sendkit-worker")
    # Webhooks go out from the same processes as mail: wherever workers run, both run.
    hooks = WebhookWorker(services)
    services.extras["webhook_worker"] = hooks
    hooks_task = asyncio.create_task(hooks.run(stop), name="sendkit-webhooks")
    return RunningWorkers(worker, task, stop, (hooks, hooks_task))


def run_process(settings: Settings, *, concurrency: int | None = None) -> None:
    """A delivery process (`sendkit worker`, or one of `sendkit serve`'s) until SIGTERM
    or SIGINT, on uvloop where it is installed: the delivery loop is mostly socket I/O,
    which uvloop's transports do in C (uvicorn runs the API on it too)."""
    main = run_standalone(settings, concurrency=concurrency)
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


async def run_standalone(settings: Settings, *, concurrency: int | None = None) -> None:
    """`sendkit worker`: until SIGTERM or SIGINT, then a bounded graceful stop."""
    services = services_mod.build(settings, api_first="defer")
    try:
        await migrate(services.db)
        running = start_workers(services, concurrency=concurrency)
        # Queued messages wake this process at once (from `sendkit serve` on this machine).
        receiver = WakeReceiver.listen(
            wakeups.directory(settings.data_dir), running.worker.wakeup.set
        )
        try:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, running.stop_event.set)
            log.info("worker_started", concurrency=running.worker.concurrency)
            await running.stop_event.wait()
            log.info("worker_stopping")
        finally:
            if receiver is not None:
                receiver.close()
            await running.stop()
    finally:
        await services.close()
