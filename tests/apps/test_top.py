"""`cogenesis top`: rates and windowed percentiles from two scrapes of real metrics endpoints."""

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from cogenesis.apps.top import figures, quantile, render, scrape
from cogenesis.core import metrics


def test_quantile_interpolates_within_the_bucket_like_prometheus():
    before = [(0.1, 0.0), (0.5, 0.0), (1.0, 0.0), (float("inf"), 0.0)]
    after = [(0.1, 10.0), (0.5, 90.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert quantile(0.5, before, after) == pytest.approx(0.1 + 0.4 * (40 / 80))
    assert quantile(0.99, before, after) == pytest.approx(0.5 + 0.5 * (9 / 10))
    assert quantile(0.5, after, after) is None  # nothing observed in the window


def test_figures_from_two_scrapes_of_a_served_registry():
    reg = CollectorRegistry()
    tokens = Counter("cogenesis_edge_tokens", "t", ["mode"], registry=reg)
    rtt = Histogram("cogenesis_step_roundtrip_seconds", "r", buckets=metrics.SECONDS_BUCKETS, registry=reg)
    address = metrics.serve(reg)
    a = scrape([address])
    tokens.labels("logits").inc(50)
    for _ in range(98):
        rtt.observe(0.004)
    rtt.observe(2.0)
    rtt.observe(2.0)
    b = scrape([address])
    b.at = a.at + 5.0  # a five-second window
    f = figures(a, b)
    assert f["edge_tokens_per_s"]["logits"] == 10.0
    assert 2.5 <= f["roundtrip_ms"]["p50"] <= 5.0  # inside the (2.5, 5] ms bucket
    assert f["roundtrip_ms"]["p99"] == 1750.0  # rank 99 of 100: halfway into the (1, 2.5] s bucket
    assert f["targets"] == 1 and not f["errors"]
    render(f)  # renders without error


def test_an_unreachable_endpoint_is_reported_not_fatal():
    snap = scrape(["127.0.0.1:9"], timeout_s=1)
    assert snap.errors and not snap.values
