"""Benchmark 2: `POST /v1/send` accepted per second and its latency, against a bare
FastAPI endpoint (bench/bare_app.py) that only answers the envelope."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from benchkit import procs, tools
from benchkit.context import BENCH, SEND_LUA, Context
from benchkit.profiling import profiled
from benchkit.report import Figure, Target, not_available
from benchkit.sendkit_side import Server


def _measure(ctx: Context, url: str, token: str) -> tools.WrkResult:
    env = ctx.wrk_env(token)
    # Warm-up first: imports, caches, pools and every worker process of the bare app.
    tools.run_wrk(url, SEND_LUA, seconds=ctx.params.warmup_seconds, env=env)
    return tools.run_wrk(url, SEND_LUA, seconds=ctx.params.intake_seconds, env=env)


@dataclass(frozen=True)
class BareApp:
    port: int
    proc: procs.Proc


@contextmanager
def bare_app(ctx: Context) -> Iterator[BareApp]:
    """Start the bare app and return at once: its supervisor and two workers finish
    importing in the background (while SendKit starts); `run` waits for them."""
    port = procs.free_port()
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "bare_app:app",
        "--app-dir",
        str(BENCH),
        "--host",
        procs.LOOPBACK,
        "--port",
        str(port),
        "--workers",
        "2",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    proc = procs.spawn("bare app", argv, log_path=ctx.work / "bare-app.log")
    try:
        yield BareApp(port, proc)
    finally:
        proc.stop()


def run(ctx: Context, server: Server, bare: BareApp) -> tuple[tools.WrkResult, tools.WrkResult]:
    """SendKit first, then the bare app (started earlier, see `bare_app`) once SendKit has
    delivered what it took in: the peer gets the same quiet machine."""
    with profiled(ctx.profile_dir, server.proc.pid, "intake"):
        ours = _measure(ctx, f"{server.base_url}/v1/send", server.demo.api_key)
    server.wait_idle()
    procs.wait_port(bare.port, bare.proc)
    return ours, _measure(ctx, f"http://{procs.LOOPBACK}:{bare.port}/v1/send", "bare")


def _details(result: tools.WrkResult) -> dict[str, object]:
    return {
        "requests": result.requests,
        "seconds": round(result.seconds, 3),
        "non_2xx": result.non_2xx,
        "socket_errors": result.socket_errors,
        "timeouts": result.timeouts,
        "latency_ms": result.latency_ms,
    }


def figures(ours: tools.WrkResult, bare: tools.WrkResult) -> list[Figure]:
    note = tools.problems(ours)
    details = {"sendkit": _details(ours), "bare": _details(bare)}
    return [
        Figure(
            "intake_rate",
            "API intake",
            "req/s",
            ours.per_second,
            peer=bare.per_second,
            peer_name="bare FastAPI",
            target=Target("ratio", ">=", 0.5),
            details=details,
            note=note,
        ),
        Figure(
            "intake_p50",
            "API intake p50",
            "ms",
            ours.latency_ms.get("50"),
            peer=bare.latency_ms.get("50"),
            peer_name="bare FastAPI",
        ),
        Figure(
            "intake_p99",
            "API intake p99",
            "ms",
            ours.latency_ms.get("99"),
            peer=bare.latency_ms.get("99"),
            peer_name="bare FastAPI",
            target=Target("value", "<=", 25),
        ),
    ]


def unavailable() -> list[Figure]:
    """Placeholders for a failed intake phase (run.py fills in the reason)."""
    return [
        not_available("intake_rate", "API intake", "req/s", "failed"),
        not_available("intake_p50", "API intake p50", "ms", "failed"),
        not_available("intake_p99", "API intake p99", "ms", "failed"),
    ]
