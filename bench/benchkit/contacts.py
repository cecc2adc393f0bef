"""Benchmark 4: importing M contacts into one app with the CSV import job, then the p99
latency of `GET /v1/contact` for its first, middle and last page."""

from __future__ import annotations

import http.client
import json
import math
import time

from benchkit import procs
from benchkit.context import Context
from benchkit.report import Figure, Target, not_available, percentile
from benchkit.sendkit_side import Server

IMPORT_TARGET = Target("value", ">=", 20_000)
PAGE_TARGET = Target("value", "<=", 20)


def import_unusable() -> str | None:
    """Why `sendkit.imports` cannot run an import job from here, if it cannot."""
    try:
        from sendkit import imports
    except ImportError as exc:
        return f"sendkit.imports cannot be imported ({exc})"
    missing = [n for n in ("upload_path", "create_job", "run_job") if not hasattr(imports, n)]
    return f"sendkit.imports has no {', '.join(missing)}" if missing else None


def import_figure(ctx: Context, server: Server) -> Figure:
    rows = ctx.params.contacts
    job, seconds = server.admin.import_contacts(server.demo, rows)
    note = None
    if job.status != "done" or job.created_rows != rows:
        note = f"job {job.status}: {job.created_rows} of {rows} created; {job.errors[:3]}"
    return Figure(
        "contacts_import",
        f"contacts import ({rows:,} rows)",
        "contacts/s",
        job.created_rows / seconds,
        target=IMPORT_TARGET,
        details={"rows": rows, "created": job.created_rows, "seconds": round(seconds, 3)},
        note=note,
    )


def _get(conn: http.client.HTTPConnection, path: str, token: str) -> bytes:
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"GET {path} answered {response.status}: {body[:300]!r}")
    return body


def _time_page(ctx: Context, server: Server, page: int) -> tuple[list[float], int]:
    """Latencies (ms) of sequential requests over one keep-alive connection, after one
    warm-up request; and how many contacts the page holds."""
    path = f"/v1/contact?appId={server.demo.app_id}&page={page}&pageSize={ctx.params.page_size}"
    conn = http.client.HTTPConnection(procs.LOOPBACK, server.port, timeout=60)
    try:
        first = json.loads(_get(conn, path, server.demo.api_key))
        samples = []
        for _ in range(ctx.params.page_requests):
            started = time.perf_counter()
            _get(conn, path, server.demo.api_key)
            samples.append((time.perf_counter() - started) * 1000)
    finally:
        conn.close()
    return samples, len(first["data"]["list"])


def page_figures(ctx: Context, server: Server) -> list[Figure]:
    pages = math.ceil(ctx.params.contacts / ctx.params.page_size)
    figures = []
    for label, page in (("first", 1), ("middle", (pages + 1) // 2), ("last", pages)):
        samples, size = _time_page(ctx, server, page)
        figures.append(
            Figure(
                f"contacts_page_{label}",
                f"GET /v1/contact {label} page p99",
                "ms",
                percentile(samples, 99),
                target=PAGE_TARGET,
                details={
                    "page": page,
                    "contacts_on_page": size,
                    "requests": len(samples),
                    "p50_ms": round(percentile(samples, 50), 3),
                    "max_ms": round(max(samples), 3),
                },
            )
        )
    return figures


def unavailable(reason: str) -> list[Figure]:
    return [
        not_available("contacts_import", "contacts import", "contacts/s", reason),
        *(
            not_available(f"contacts_page_{p}", f"GET /v1/contact {p} page p99", "ms", reason)
            for p in ("first", "middle", "last")
        ),
    ]


def run(ctx: Context, server: Server) -> list[Figure]:
    reason = import_unusable()
    if reason is not None:
        return unavailable(reason)
    return [import_figure(ctx, server), *page_figures(ctx, server)]
