"""Benchmark 5: peak RSS of `sendkit serve` with K queued messages, while it delivers them
(relay to smtp-sink) for a bounded time.

The queue is filled through `sendkit.messages.submit` (the public path, never SQL) before
the server starts; run.py does that while the other servers boot. `memory_enqueue_seconds`
bounds the filling (quick mode: SendKit's submit path is too slow for 10,000 messages in a
one-minute run); the figure then says how many were queued and how long K would take.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from benchkit import procs
from benchkit.context import Context
from benchkit.report import Figure, Target
from benchkit.sendkit_side import Admin, Deployment, launch_serve

TARGET = Target("value", "<=", 250)


@dataclass
class Prepared:
    deployment: Deployment
    admin: Admin
    queued: int
    enqueue_seconds: float


@contextmanager
def prepared(ctx: Context) -> Iterator[Prepared]:
    """A deployment of its own with up to `memory_messages` queued messages."""
    deployment = Deployment("memory", ctx.work / "memory", ctx.sink_port)
    admin = Admin(deployment)
    try:
        demo = admin.prepare_demo()
        budget = ctx.params.memory_enqueue_seconds
        deadline = time.monotonic() + budget if budget > 0 else None
        started = time.perf_counter()
        queued = admin.enqueue(demo.account_id, ctx.params.memory_messages, ctx.body, deadline)
        yield Prepared(deployment, admin, queued, time.perf_counter() - started)
    finally:
        admin.close()


def _watch(proc: procs.Proc, admin: Admin, total: int, seconds: float) -> tuple[int, int]:
    """Sample /proc while the server delivers; (VmHWM kB, delivered) at the end. The
    status counts (a scan of the queue) are taken once a second only."""
    deadline = time.monotonic() + seconds
    hwm = delivered = 0
    next_count = time.monotonic() + 1.0
    while time.monotonic() < deadline and proc.running() and delivered < total:
        hwm = max(hwm, procs.tree_peak_kb(proc.pid))
        if time.monotonic() >= next_count:
            delivered = admin.counts().get("delivered", 0)
            next_count += 1.0
        time.sleep(0.1)
    hwm = max(hwm, procs.tree_peak_kb(proc.pid))
    return hwm, admin.counts().get("delivered", 0)


def _note(ctx: Context, prep: Prepared) -> str | None:
    wanted = ctx.params.memory_messages
    if prep.queued >= wanted:
        return None
    rate = prep.queued / prep.enqueue_seconds
    return (
        f"{prep.queued:,} of {wanted:,} queued: the {ctx.params.memory_enqueue_seconds} s "
        f"enqueue budget ran out (submit at {rate:,.0f} msg/s; {wanted:,} would take "
        f"{wanted / rate:,.0f} s)"
    )


@contextmanager
def launched(ctx: Context, prep: Prepared) -> Iterator[tuple[int, procs.Proc]]:
    """`sendkit serve` on the filled queue, started without waiting for it: run.py lets
    the DKIM benchmark (CPU time per signature, indifferent to a neighbour) run while it
    boots. VmHWM counts from the process's start either way."""
    port, proc = launch_serve(prep.deployment, ctx.work)
    try:
        yield port, proc
    finally:
        proc.stop()


def measure(ctx: Context, prep: Prepared, port: int, proc: procs.Proc) -> Figure:
    procs.wait_port(port, proc)
    hwm_kb, delivered = _watch(proc, prep.admin, prep.queued, ctx.params.memory_seconds)
    return Figure(
        "memory_peak_rss",
        f"peak RSS, {prep.queued:,} queued",
        "MB",
        hwm_kb * 1024 / 1e6,
        target=TARGET,
        details={
            "wanted": ctx.params.memory_messages,
            "queued": prep.queued,
            "enqueue_seconds": round(prep.enqueue_seconds, 1),
            "enqueue_per_s": round(prep.queued / prep.enqueue_seconds, 1),
            "delivered_in_window": delivered,
            "window_seconds": ctx.params.memory_seconds,
        },
        note=_note(ctx, prep),
    )
