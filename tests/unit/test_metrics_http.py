"""`metrics.HttpRequests`: the same samples prometheus_client's own Counter and Histogram
give for the same requests (bucket edges included), without their per-call locks."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sendkit import metrics


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def test_the_samples_are_prometheus_clients() -> None:
    ours = CollectorRegistry()
    http = metrics.HttpRequests()
    ours.register(http)
    theirs = CollectorRegistry()
    counter = Counter(
        "sendkit_http_requests",
        "HTTP requests by route template, method and status code.",
        ["route", "method", "code"],
        registry=theirs,
    )
    histogram = Histogram(
        "sendkit_http_request_duration_seconds",
        "HTTP request handling time by route template.",
        ["route"],
        buckets=metrics._HTTP_BUCKETS,
        registry=theirs,
    )
    rng = random.Random(7)
    edges = [*metrics._HTTP_BUCKETS, 0.0, 20.0]  # on a bound, below all, past all
    for i in range(500):
        route = rng.choice(["/v1/send", "/v1/contact", "<unmatched>"])
        method = rng.choice(["GET", "POST"])
        code = rng.choice([200, 400, 429, 500])
        seconds = edges[i] if i < len(edges) else rng.expovariate(20)
        http.observe(route, method, code, seconds)
        counter.labels(route, method, str(code)).inc()
        histogram.labels(route).observe(seconds)
    mine, reference = _samples(ours), _samples(theirs)
    assert mine.keys() == reference.keys()
    for key, value in reference.items():
        assert abs(mine[key] - value) < 1e-9, key
    labels = (("code", "200"), ("method", "POST"), ("route", "/v1/send"))
    assert http.count("/v1/send", "POST", 200) == reference[("sendkit_http_requests_total", labels)]
