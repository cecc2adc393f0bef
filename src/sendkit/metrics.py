"""Prometheus metrics, one registry per process's Services (so tests never collide).

Counters and histograms are observed where things happen (the HTTP middleware, the
delivery and webhook workers). Queue depths are read from the database at scrape time:
the queue is shared by every process, so only the database knows its depth.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from sendkit.db import DUE, DUE_STATUSES, Database, messages, webhook_deliveries

# The statuses of work still to do; reported even when empty, so series do not vanish.
MESSAGE_STATUSES = DUE_STATUSES
WEBHOOK_STATUSES = ("pending", "sending")

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400)
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http = HttpRequests()
        r.register(self.http)
        self.queue_depth = Gauge(
            "sendkit_queue_depth",
            "Messages waiting in the queue, by status.",
            ["status"],
            registry=r,
        )
        self.webhook_queue_depth = Gauge(
            "sendkit_webhook_queue_depth",
            "Webhook deliveries waiting, by status.",
            ["status"],
            registry=r,
        )
        self.deliveries = Counter(
            "sendkit_deliveries",
            "Delivery outcomes recorded by this process's workers.",
            ["outcome"],
            registry=r,
        )
        self.delivery_latency = Histogram(
            "sendkit_delivery_latency_seconds",
            "From acceptance (queued) to the final outcome of a message.",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._delivery_children: dict[str, tuple[Counter, Histogram]] = {}
        self.delivery_attempt = Histogram(
            "sendkit_delivery_attempt_seconds",
            "Duration of one SMTP (or sandbox) delivery attempt.",
            buckets=_HTTP_BUCKETS,
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "sendkit_webhook_attempts",
            "Webhook attempts by the status the delivery was left in.",
            ["status"],
            registry=r,
        )

    def observe_http(self, route: str, method: str, code: int, seconds: float) -> None:
        self.http.observe(route, method, code, seconds)

    def observe_delivery(
        self, outcome: str, *, latency_s: float | None, attempt_s: float | None
    ) -> None:
        # The labelled children are kept: `labels()` formats and looks them up again
        # under a lock on every call.
        children = self._delivery_children.get(outcome)
        if children is None:
            children = (self.deliveries.labels(outcome), self.delivery_latency.labels(outcome))
            self._delivery_children[outcome] = children
        children[0].inc()
        if latency_s is not None:
            children[1].observe(max(latency_s, 0.0))
        if attempt_s is not None:
            self.delivery_attempt.observe(max(attempt_s, 0.0))

    async def render(self, db: Database) -> bytes:
        """The exposition text, with the queue depths read now."""
        for status, n in (await _depths(db, messages.c.status, MESSAGE_STATUSES, DUE)).items():
            self.queue_depth.labels(status).set(n)
        hooks = await _depths(db, webhook_deliveries.c.status, WEBHOOK_STATUSES)
        for status, n in hooks.items():
            self.webhook_queue_depth.labels(status).set(n)
        return generate_latest(self.registry)


class HttpRequests(Collector):
    """HTTP requests by route template, method and status code, and their durations by
    route: counted in plain dicts and lists on every request, made into Prometheus
    families only when scraped. prometheus_client's labelled children take a lock and
    check that they may be observed on every `inc()` and `observe()` (~4 % of a send's
    CPU in the API process). Observed on the event loop's thread only."""

    def __init__(self) -> None:
        # (route, method, code) -> [requests, first seen (unix seconds)]
        self._counts: dict[tuple[str, str, int], list[float]] = {}
        # route -> (requests per bucket, the last one past every bound; [their sum])
        self._durations: dict[str, tuple[list[int], list[float]]] = {}

    def observe(self, route: str, method: str, code: int, seconds: float) -> None:
        counted = self._counts.get((route, method, code))
        if counted is None:
            counted = self._counts[(route, method, code)] = [0, time.time()]
        counted[0] += 1
        timed = self._durations.get(route)
        if timed is None:
            timed = self._durations[route] = ([0] * (len(_HTTP_BUCKETS) + 1), [0.0])
        # The first bound at or above the value: Prometheus buckets are "less or equal".
        timed[0][bisect.bisect_left(_HTTP_BUCKETS, seconds)] += 1
        timed[1][0] += seconds

    def count(self, route: str, method: str, code: int) -> int:
        counted = self._counts.get((route, method, code))
        return 0 if counted is None else int(counted[0])

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "sendkit_http_requests",
            "HTTP requests by route template, method and status code.",
            labels=["route", "method", "code"],
        )
        for (route, method, code), (n, created) in list(self._counts.items()):
            requests.add_metric([route, method, str(code)], n, created=created)
        yield requests
        durations = HistogramMetricFamily(
            "sendkit_http_request_duration_seconds",
            "HTTP request handling time by route template.",
            labels=["route"],
        )
        bounds = [floatToGoString(b) for b in (*_HTTP_BUCKETS, math.inf)]  # type: ignore[no-untyped-call]
        for route, (counts, total) in list(self._durations.items()):
            cumulative = itertools.accumulate(counts)
            durations.add_metric([route], list(zip(bounds, cumulative, strict=True)), total[0])
        yield durations


async def _depths(
    db: Database, column: Any, statuses: tuple[str, ...], where: Any = None
) -> dict[str, int]:
    # Only the statuses still in the queue: counting every delivered message ever sent on
    # each scrape would grow with the log, and is not queue depth. `where`: the same rows
    # as the statuses, written as a partial index has it (so it is used).
    chosen = column.in_(statuses) if where is None else where
    query = sa.select(column, sa.func.count()).where(chosen).group_by(column)
    async with db.read() as conn:
        found = {status: int(n) for status, n in await conn.execute(query)}
    return {status: found.get(status, 0) for status in statuses}
