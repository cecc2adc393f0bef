"""What every benchmark gets: the sizes for this mode, where to work, the shared sink."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
SEND_LUA = BENCH / "send.lua"


@dataclass(frozen=True)
class Params:
    e2e_messages: int
    intake_seconds: int
    contacts: int
    page_requests: int
    memory_messages: int
    memory_seconds: int
    memory_enqueue_seconds: int = 600  # 0: no bound
    body_bytes: int = 1024
    page_size: int = 500
    warmup_seconds: int = 1
    # `sendkit serve` as in production (SENDKIT_WEB_PROCESSES, with Redis when more than
    # one; 1 when Redis does not answer). SQLite has one writer: a second process adds
    # lock hand-offs and took intake from ~880 to ~650 req/s here. PostgreSQL: one API
    # process per core, the delivery process counted (two API processes beside it
    # delivered 1,109-1,242 msg/s end to end, one 1,229-1,323, in the fifth round).
    serve_processes_sqlite: int = 1
    serve_processes_postgresql: int = 1
    # SENDKIT_WORKER_PROCESSES for the end-to-end and intake servers: delivery in a niced
    # process of its own, as README's production start has it. The memory benchmark keeps
    # delivery inside `sendkit serve` (the default), so one process's peak RSS is all of it.
    worker_processes: int = 1
    # Turns of each side of the end-to-end and intake comparisons (their medians count).
    rounds: int = 3

    @classmethod
    def full(cls) -> Params:
        return cls(
            e2e_messages=20_000,
            intake_seconds=10,
            contacts=1_000_000,
            page_requests=200,
            memory_messages=1_000_000,
            memory_seconds=30,
        )

    @classmethod
    def quick(cls) -> Params:
        return cls(
            e2e_messages=500,
            intake_seconds=3,
            contacts=20_000,
            page_requests=30,
            memory_messages=10_000,
            memory_seconds=5,
            memory_enqueue_seconds=5,
            rounds=1,
        )


@dataclass
class Context:
    quick: bool
    params: Params
    work: Path  # temporary: data directories, Postfix, logs
    sink_port: int
    profile_dir: Path | None = None

    @property
    def body(self) -> str:
        return "x" * self.params.body_bytes

    def wrk_env(self, token: str, total: int = 0) -> dict[str, str]:
        return {
            "SENDKIT_BENCH_TOKEN": token,
            "SENDKIT_BENCH_TOTAL": str(total),
            "SENDKIT_BENCH_BODY": str(self.params.body_bytes),
        }
