"""Prometheus metrics with fixed names (dashboards, `cogenesis top` and checks rely on them).

Two registries: ``CLOUD`` (a replica) and ``EDGE`` (an edge pool, a Locust process). A process
serves the registry of its role on an HTTP port (``serve``) and announces the address on the bus
(``announce``: ``cg:metrics:{role}:{name}`` with a TTL), so ``cogenesis top`` and Prometheus' file
discovery find every process wherever it runs. Labels are few and fixed: ``mode`` (sketch|logits),
``outcome`` (ok|failed|cut), a refusal's ``reason`` and a resume's ``cause``; never a session id, never text.
"""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

CLOUD = CollectorRegistry(auto_describe=True)
EDGE = CollectorRegistry(auto_describe=True)

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
FUSION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)
ACCEPTED_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16)

# ---- cloud (a replica) -------------------------------------------------------------------------
cloud_tokens = Counter(
    "cogenesis_cloud_tokens",
    "Tokens the cloud model processed: logits = tokens the edge sent in steps, sketch = outline tokens generated.",
    ["mode"],
    registry=CLOUD,
)
step_batch_size = Histogram(
    "cogenesis_cloud_step_batch_size",
    "Requests (opens + steps) served by one bus pass.",
    buckets=BATCH_BUCKETS,
    registry=CLOUD,
)
step_seconds = Histogram(
    "cogenesis_cloud_step_seconds",
    "Model time of one bus pass (its batched forward passes).",
    buckets=SECONDS_BUCKETS,
    registry=CLOUD,
)
active_sessions = Gauge("cogenesis_active_sessions", "Logits sessions open on the replica.", registry=CLOUD)
kv_cache_bytes = Gauge("cogenesis_kv_cache_bytes", "Bytes of KV cache the replica's sessions hold.", registry=CLOUD)
sketch_requests = Counter("cogenesis_sketch_requests", "Outline requests answered.", registry=CLOUD)
bus_queue_depth = Gauge(
    "cogenesis_bus_queue_depth",
    "Entries waiting on the replica's input stream and the shared open stream after its last read.",
    registry=CLOUD,
)
refusals = Counter(
    "cogenesis_cloud_refusals",
    "Requests a replica answered with an error instead of serving them, by reason "
    "(busy, bad_request, too_large, forbidden, deadline, unknown_session, internal).",
    ["reason"],
    registry=CLOUD,
)
claimed_entries = Counter(
    "cogenesis_cloud_claimed_entries",
    "Pending bus entries a replica took over from a dead replica (XAUTOCLAIM).",
    registry=CLOUD,
)
swept_sessions = Counter(
    "cogenesis_cloud_swept_sessions",
    "Idle sessions a replica closed on its sweeper's timer (their edge vanished).",
    registry=CLOUD,
)
outlines_active = Gauge(
    "cogenesis_cloud_outlines",
    "Outlines being written in the step loop's batch, or waiting for a slot.",
    registry=CLOUD,
)
# the device gateway (a gateway replica serves CLOUD too; its refusals count in ``refusals`` by reason:
# bad_request, too_large, forbidden, busy, rate_limited, replica_lost, unavailable)
gateway_connections = Gauge(
    "cogenesis_gateway_connections", "Device WebSocket connections a gateway replica holds.", registry=CLOUD
)
gateway_requests = Counter(
    "cogenesis_gateway_requests", "Device messages a gateway replica relayed to the bus.", registry=CLOUD
)
gateway_replies = Counter(
    "cogenesis_gateway_replies", "Replies a gateway replica relayed from the bus to devices.", registry=CLOUD
)

# ---- edge (a pool or a Locust process) ---------------------------------------------------------
edge_tokens = Counter("cogenesis_edge_tokens", "Tokens the devices wrote.", ["mode"], registry=EDGE)
step_roundtrip_seconds = Histogram(
    "cogenesis_step_roundtrip_seconds", "Logits step: edge sends -> reply read.", buckets=SECONDS_BUCKETS, registry=EDGE
)
fusion_seconds = Histogram(
    "cogenesis_fusion_seconds",
    "One fusion of the cloud's top-k with the small model's distribution.",
    buckets=FUSION_BUCKETS,
    registry=EDGE,
)
lookahead_accepted_tokens = Histogram(
    "cogenesis_lookahead_accepted_tokens",
    "Draft tokens accepted per cloud reply that carried drafts.",
    buckets=ACCEPTED_BUCKETS,
    registry=EDGE,
)
resumes = Counter(
    "cogenesis_edge_resumes",
    "Sessions the edge re-opened and replayed elsewhere, by cause (replica_lost, unknown_session, redis).",
    ["cause"],
    registry=EDGE,
)
busy_retries = Counter(
    "cogenesis_edge_busy_retries", "Opens and outlines the edge retried after a busy refusal.", registry=EDGE
)
sessions = Counter(
    "cogenesis_sessions", "Sessions ended, by mode and outcome (ok, failed, cut).", ["mode", "outcome"], registry=EDGE
)

for _reason in ("busy", "bad_request", "too_large", "forbidden", "deadline", "unknown_session", "internal"):
    refusals.labels(_reason)
for _cause in ("replica_lost", "unknown_session", "redis"):
    resumes.labels(_cause)
for _mode in ("sketch", "logits"):  # every series exists from the start (rate() needs two samples)
    cloud_tokens.labels(_mode)
    edge_tokens.labels(_mode)
    for _outcome in ("ok", "failed", "cut"):
        sessions.labels(_mode, _outcome)


def session_done(mode: str, outcome: str, tokens: int) -> None:
    sessions.labels(mode, outcome).inc()
    if tokens:
        edge_tokens.labels(mode).inc(tokens)


METRICS_PREFIX = "cg:metrics"
ANNOUNCE_TTL_S = 30


def serve(registry: CollectorRegistry, port: int = 0, host: str = "127.0.0.1") -> str:
    """Serve ``registry`` on ``host:port`` (0: a free port); returns ``host:port``."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    return f"{host}:{server.server_port}"


def announce(redis_client, role: str, name: str, address: str, ttl_s: int = ANNOUNCE_TTL_S) -> None:
    """Tell ``cogenesis top`` / Prometheus discovery where this process's metrics are (refresh within ttl_s)."""
    redis_client.set(f"{METRICS_PREFIX}:{role}:{name}", address, ex=ttl_s)


def targets(redis_client) -> dict[str, list[str]]:
    """Announced metrics addresses by role: {"cloud": [...], "edge": [...]}."""
    out: dict[str, list[str]] = {"cloud": [], "edge": []}
    for key in redis_client.scan_iter(match=f"{METRICS_PREFIX}:*", count=1000):
        key = key.decode() if isinstance(key, bytes) else key
        value = redis_client.get(key)
        if value is not None:
            out.setdefault(key.split(":")[2], []).append(value.decode() if isinstance(value, bytes) else value)
    return {k: sorted(v) for k, v in out.items()}


def write_file_sd(path: str | Path, found: dict[str, list[str]]) -> None:
    """Prometheus file-based discovery: one target group per role."""
    groups = [{"targets": addrs, "labels": {"role": role}} for role, addrs in sorted(found.items()) if addrs]
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(groups, indent=1))
    tmp.replace(path)
