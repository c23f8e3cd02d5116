"""Metrics: fixed names, few labels, served over HTTP and announced on the bus for discovery."""

import json

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cogenesis.core import metrics

CLOUD_NAMES = [
    "cogenesis_cloud_tokens_total",
    "cogenesis_cloud_step_batch_size_bucket",
    "cogenesis_cloud_step_seconds_bucket",
    "cogenesis_active_sessions",
    "cogenesis_kv_cache_bytes",
    "cogenesis_sketch_requests_total",
    "cogenesis_bus_queue_depth",
]
EDGE_NAMES = [
    "cogenesis_edge_tokens_total",
    "cogenesis_step_roundtrip_seconds_bucket",
    "cogenesis_fusion_seconds_bucket",
    "cogenesis_lookahead_accepted_tokens_bucket",
    "cogenesis_sessions_total",
]


def _samples(registry):
    return [s for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples]


@pytest.mark.parametrize("registry, names", [(metrics.CLOUD, CLOUD_NAMES), (metrics.EDGE, EDGE_NAMES)])
def test_every_documented_metric_is_exposed_with_few_labels(registry, names):
    samples = _samples(registry)
    exposed = {s.name for s in samples}
    for name in names:
        assert name in exposed, name
    # fixed label sets, never a session id or text: mode, outcome, a refusal's reason, a resume's cause
    assert {k for s in samples for k in s.labels} <= {"mode", "outcome", "reason", "cause", "le"}


def test_sessions_by_mode_and_outcome_exist_before_any_session():
    got = {
        (s.labels["mode"], s.labels["outcome"]) for s in _samples(metrics.EDGE) if s.name == "cogenesis_sessions_total"
    }
    assert got == {(m, o) for m in ("sketch", "logits") for o in ("ok", "failed", "cut")}


def test_served_announced_and_discovered(redis_url, tmp_path):
    import redis

    address = metrics.serve(metrics.EDGE)
    before = metrics.sessions.labels("logits", "ok")._value.get()
    metrics.session_done("logits", "ok", 7)
    body = httpx.get(f"http://{address}/metrics", timeout=5).text
    assert f'cogenesis_sessions_total{{mode="logits",outcome="ok"}} {before + 1}' in body
    bus = redis.Redis.from_url(redis_url)
    metrics.announce(bus, "edge", "test-pool", address, ttl_s=30)
    metrics.announce(bus, "cloud", "r1", "127.0.0.1:1", ttl_s=30)
    assert 0 < bus.ttl("cg:metrics:edge:test-pool") <= 30
    found = metrics.targets(bus)
    assert found == {"cloud": ["127.0.0.1:1"], "edge": [address]}
    metrics.write_file_sd(tmp_path / "targets.json", found)
    groups = json.loads((tmp_path / "targets.json").read_text())
    assert {"targets": [address], "labels": {"role": "edge"}} in groups
