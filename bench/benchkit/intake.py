"""Benchmark 2: `POST /v1/send` accepted per second and its latency, against a bare
FastAPI endpoint (bench/bare_app.py) that only answers the envelope.

`rounds` turns of each side (SendKit on a fresh deployment, then the bare app); each
figure is the median of its rounds, the rate's ratio the median of the rounds' ratios
(see e2e.py for why)."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

from benchkit import procs, tools
from benchkit.context import BENCH, SEND_LUA, Context
from benchkit.profiling import profiled
from benchkit.report import Figure, Target, not_available, rounds_note
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


Round = tuple[tools.WrkResult, tools.WrkResult]  # SendKit's, the bare app's


def run_round(
    ctx: Context, name: str, fresh: AbstractContextManager[Server], bare: BareApp
) -> Round:
    """SendKit on a fresh server (entering `fresh` starts it), which is then stopped with
    what it took in still queued, and the bare app (started earlier, see `bare_app`) on
    the same quiet machine, without waiting for a drain."""
    with fresh as server, profiled(ctx.profile_dir, server.proc.pid, name):
        ours = _measure(ctx, f"{server.base_url}/v1/send", server.demo.api_key)
    tools.settle()  # what SendKit wrote is on disk before the peer's turn
    procs.wait_port(bare.port, bare.proc)
    return ours, _measure(ctx, f"http://{procs.LOOPBACK}:{bare.port}/v1/send", "bare")


def _details(result: tools.WrkResult) -> dict[str, object]:
    return {
        "requests": result.requests,
        "per_s": round(result.per_second, 1),
        "seconds": round(result.seconds, 3),
        "non_2xx": result.non_2xx,
        "socket_errors": result.socket_errors,
        "timeouts": result.timeouts,
        "latency_ms": result.latency_ms,
    }


def _median(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def figures(rounds: list[Round], wanted: int) -> list[Figure]:
    """Each side's median over the rounds; the rate's ratio is the median of the rounds'
    own ratios (the target's), each latency the median of the rounds' percentiles."""
    ours, bare = [r[0] for r in rounds], [r[1] for r in rounds]
    notes = [note] if (note := rounds_note(len(rounds), wanted)) else []
    notes += [f"round {i}: {tools.problems(r)}" for i, r in enumerate(ours, 1) if tools.problems(r)]
    details = {"rounds": [{"sendkit": _details(o), "bare": _details(b)} for o, b in rounds]}

    def latency(side: list[tools.WrkResult], pct: str) -> float | None:
        return _median([result.latency_ms.get(pct) for result in side])

    return [
        Figure(
            "intake_rate",
            "API intake",
            "req/s",
            _median([result.per_second for result in ours]),
            peer=_median([result.per_second for result in bare]),
            peer_name="bare FastAPI",
            target=Target("ratio", ">=", 0.5),
            paired_ratio=_median([o.per_second / b.per_second for o, b in rounds if b.per_second]),
            details=details,
            note="; ".join(notes) or None,
        ),
        Figure(
            "intake_p50",
            "API intake p50",
            "ms",
            latency(ours, "50"),
            peer=latency(bare, "50"),
            peer_name="bare FastAPI",
        ),
        Figure(
            "intake_p99",
            "API intake p99",
            "ms",
            latency(ours, "99"),
            peer=latency(bare, "99"),
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
